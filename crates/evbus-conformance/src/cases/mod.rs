//! The catalogue: every case, with what it needs and its time limit.

use std::time::Duration;

use evbus::{Capability, Transport};
use futures::future::BoxFuture;

use crate::Need;
use crate::support::{CaseResult, Ctx};

mod bus;
mod lifecycle;
mod queue;
mod samples;
mod schema;
mod topic;

/// Imports shared by the case modules.
mod prelude {
    pub(super) use std::collections::{HashMap, HashSet};
    pub(super) use std::sync::Arc;
    pub(super) use std::time::Duration;

    pub(super) use evbus::delivery::DEAD_LETTER_REASON;
    pub(super) use evbus::{
        ConsumerOptions, ErrorKind, Event, Queue, Settlement, StartPosition, SubscribeOptions,
        Subscription, Topic, Transport, dead_letter_queue_name,
    };
    pub(super) use tokio::time::Instant;

    pub(super) use crate::support::{
        CaseResult, Context, Ctx, Failure, QUIET, SHORT_VISIBILITY, WAIT, bounded, by_id, ensure,
        expect_sentinel, fail, ids, next, queue_sentinel, receive_exactly, same_event, seq, spawn,
        topic_sentinel,
    };
}

/// Time limit of a case unless it says otherwise.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit of the outage cases (a broker restart can take a while).
const OUTAGE_TIMEOUT: Duration = Duration::from_secs(180);

/// One behaviour.
pub(crate) struct Case<T: Transport + 'static> {
    /// The behaviour, in snake_case (the name of the function that shows it).
    pub(crate) name: &'static str,
    /// What it needs beyond the common contract.
    pub(crate) needs: &'static [Need],
    /// Its time limit.
    pub(crate) timeout: Duration,
    /// The case itself.
    pub(crate) run: fn(Ctx<T>) -> BoxFuture<'static, CaseResult>,
}

macro_rules! case {
    ($module:ident :: $name:ident) => {
        case!($module::$name, needs: [], timeout: CASE_TIMEOUT)
    };
    ($module:ident :: $name:ident, needs: [$($need:expr),* $(,)?]) => {
        case!($module::$name, needs: [$($need),*], timeout: CASE_TIMEOUT)
    };
    ($module:ident :: $name:ident, needs: [$($need:expr),* $(,)?], timeout: $timeout:expr) => {
        Case {
            name: stringify!($name),
            needs: &[$($need),*],
            timeout: $timeout,
            run: |ctx| Box::pin($module::$name(ctx)),
        }
    };
}

/// Every case, in the order they run.
pub(crate) fn all<T: Transport + 'static>() -> Vec<Case<T>> {
    const PER_KEY_ORDER: Need = Need::Capability(Capability::PerKeyOrder);
    const REPLAY: Need = Need::Capability(Capability::Replay);
    const ONE_MIB: Need = Need::Capability(Capability::Payload(1 << 20));
    const TWO_COMPETING: Need = Need::Capability(Capability::CompetingConsumers(2));
    const THREE_COMPETING: Need = Need::Capability(Capability::CompetingConsumers(3));
    vec![
        // Topic
        case!(topic::topic_durable_subscription_receives_events_published_while_offline),
        case!(topic::topic_two_subscriptions_each_receive_every_event),
        case!(topic::topic_consumers_sharing_a_subscription_split_the_events, needs: [TWO_COMPETING]),
        case!(topic::topic_isolation_nothing_crosses_between_topics),
        case!(topic::topic_envelope_round_trips_every_attribute_and_extension),
        case!(topic::topic_unicode_json_and_text_data_round_trip_byte_exact),
        case!(topic::topic_binary_data_with_a_non_json_content_type_round_trips_byte_exact),
        case!(topic::topic_event_without_data_or_optional_attributes_round_trips),
        case!(topic::topic_per_key_order_is_kept_under_concurrent_publishing, needs: [PER_KEY_ORDER]),
        case!(topic::topic_earliest_start_replays_retained_history, needs: [REPLAY]),
        case!(topic::topic_latest_start_receives_only_new_events),
        case!(topic::topic_anonymous_subscription_starts_at_now),
        case!(topic::topic_anonymous_subscriptions_each_receive_every_event),
        case!(topic::topic_many_concurrent_publishers_on_many_topics_lose_nothing),
        case!(topic::topic_closing_one_subscription_leaves_the_others_working),
        case!(topic::topic_durable_subscription_closed_mid_stream_and_reopened_misses_nothing),
        case!(topic::topic_publish_batch_delivers_every_event),
        case!(topic::topic_publish_batch_keeps_publish_order_per_key, needs: [PER_KEY_ORDER]),
        case!(topic::topic_nack_redelivers_only_to_the_nacking_subscription),
        case!(topic::topic_max_attempts_dead_letters_to_the_subscription_dead_letter_queue),
        // Queue
        case!(queue::queue_send_receive_ack_delivers_each_event_once),
        case!(queue::queue_competing_consumers_handle_each_event_exactly_once, needs: [THREE_COMPETING]),
        case!(queue::queue_envelope_round_trips_byte_exact),
        case!(queue::queue_send_batch_delivers_every_event),
        case!(queue::queue_send_batch_keeps_batch_order_for_one_consumer, needs: [PER_KEY_ORDER]),
        case!(queue::queue_nack_redelivers_with_the_attempt_count_increased),
        case!(queue::queue_nack_with_delay_redelivers_no_sooner_than_the_delay),
        case!(queue::queue_nack_with_a_delay_longer_than_the_visibility_timeout_waits_the_delay),
        case!(queue::queue_nack_with_delay_does_not_hold_back_later_events),
        case!(queue::queue_unacked_events_of_a_vanished_consumer_are_redelivered_to_another),
        case!(queue::queue_renewed_delivery_stays_with_its_consumer_past_the_visibility_timeout),
        case!(queue::queue_renewing_after_the_visibility_timeout_fails_and_takes_nothing_back),
        case!(queue::queue_events_fetched_ahead_wait_for_a_consumer_in_use_past_the_visibility_timeout, needs: [PER_KEY_ORDER]),
        case!(queue::queue_visibility_timeouts_out_of_range_are_refused_and_duration_max_is_never),
        case!(queue::queue_max_attempts_dead_letters_with_reason_and_attempt_count),
        case!(queue::queue_event_whose_consumer_vanished_on_the_last_attempt_is_dead_lettered),
        case!(queue::queue_explicit_dead_letter_moves_the_event_with_its_reason),
        case!(queue::queue_an_event_sent_and_dead_lettered_again_is_kept_again),
        case!(queue::queue_undecodable_message_is_dead_lettered_and_does_not_block, needs: [Need::RawProducer]),
        case!(queue::queue_acking_twice_is_an_already_settled_error),
        case!(queue::queue_acking_after_nack_is_an_already_settled_error),
        case!(queue::queue_in_flight_limit_holds_back_deliveries_until_one_is_settled),
        case!(queue::queue_large_payload_round_trips, needs: [ONE_MIB]),
        case!(queue::queue_oversized_payload_fails_with_too_large, needs: [Need::PayloadLimit]),
        case!(
            queue::queue_check_size_takes_the_largest_event_a_send_takes,
            needs: [Need::PayloadLimit]
        ),
        case!(
            queue::queue_check_size_takes_the_largest_subject_a_send_takes,
            needs: [Need::PayloadLimit]
        ),
        case!(
            queue::queue_check_size_takes_the_largest_partition_key_a_send_takes,
            needs: [Need::PayloadLimit]
        ),
        // Lifecycle and faults
        case!(lifecycle::lifecycle_close_flushes_every_accepted_publish),
        case!(lifecycle::lifecycle_operations_after_close_fail_with_closed),
        case!(lifecycle::lifecycle_close_ends_open_subscriptions),
        case!(lifecycle::lifecycle_close_ends_a_subscription_whose_in_flight_slots_are_all_taken),
        case!(lifecycle::lifecycle_closing_twice_is_ok),
        case!(lifecycle::lifecycle_health_is_healthy_when_open_and_not_after_close),
        case!(lifecycle::lifecycle_deleting_a_queue_discards_its_events_and_may_be_repeated),
        case!(lifecycle::lifecycle_deleting_a_topic_discards_its_subscriptions_and_may_be_repeated),
        case!(
            lifecycle::lifecycle_topic_outage_loses_no_accepted_publish_and_consumers_resume,
            needs: [Need::BrokerControl],
            timeout: OUTAGE_TIMEOUT
        ),
        case!(
            lifecycle::lifecycle_queue_outage_loses_no_accepted_send_and_consumers_resume,
            needs: [Need::BrokerControl],
            timeout: OUTAGE_TIMEOUT
        ),
        case!(
            lifecycle::lifecycle_health_reflects_a_broker_outage,
            needs: [Need::BrokerControl],
            timeout: OUTAGE_TIMEOUT
        ),
        // Schema (through the Bus)
        case!(schema::schema_invalid_event_is_rejected_at_emit_and_nothing_is_published),
        case!(schema::schema_invalid_event_from_a_raw_producer_is_dead_lettered_and_never_handled),
        // Bus
        case!(bus::bus_a_prefetching_handler_runs_a_backlog_past_the_visibility_timeout_once_in_order, needs: [PER_KEY_ORDER]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_unique_snake_case_and_scoped() {
        let cases = all::<evbus::memory::MemoryTransport>();
        let mut seen = std::collections::HashSet::new();
        for case in &cases {
            assert!(seen.insert(case.name), "duplicate case {}", case.name);
            assert!(
                case.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{} is not snake_case",
                case.name
            );
            assert!(
                ["topic_", "queue_", "lifecycle_", "schema_", "bus_"]
                    .iter()
                    .any(|p| case.name.starts_with(p)),
                "{} does not say what it is about",
                case.name
            );
        }
        assert!(cases.len() >= 28);
    }
}
