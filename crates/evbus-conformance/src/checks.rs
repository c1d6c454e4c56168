//! Checks adapters' own tests share beyond the suite's cases. They panic with a message
//! naming what failed, as a `#[test]` expects.

use std::time::Duration;

use evbus::Subscription;

/// Asserts that each subscription, named by its `what`, ends (its stream returns `None`)
/// within `within`: not a delivery, not an error, not silence.
pub async fn each_ends_within(subscriptions: Vec<(&str, Subscription)>, within: Duration) {
    for (what, mut sub) in subscriptions {
        match tokio::time::timeout(within, sub.next_delivery()).await {
            Ok(None) => {}
            Ok(Some(other)) => panic!("{what} yielded {other:?} instead of ending"),
            Err(_) => panic!("{what} did not end within {within:?}"),
        }
    }
}
