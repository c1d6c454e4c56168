//! Property tests for the parsers that take foreign bytes (issue 18): CloudEvents structured
//! JSON, binary-mode headers as each adapter's binding reads them, and schema catalogue
//! files. No input may panic; a refusal is the documented error kind
//! (`ErrorKind::InvalidEvent` for events, a `SchemaError` for catalogues).

use bytes::Bytes;
use evbus::binding::{self, HeaderStyle};
use evbus::{Catalog, ErrorKind, Event};
use proptest::prelude::*;

/// A valid structured event, to mutate.
const VALID: &str = r#"{"specversion":"1.0","id":"e-1","source":"/shop","type":"order.created","time":"2026-01-01T00:00:00Z","datacontenttype":"application/json","partitionkey":"k","data":{"n":1}}"#;

const STYLES: [HeaderStyle; 5] = [
    HeaderStyle::KAFKA,
    HeaderStyle::HTTP,
    HeaderStyle::NATS,
    HeaderStyle::AMQP,
    HeaderStyle::REDIS,
];

fn check_event(result: evbus::Result<Event>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert_eq!(e.kind(), ErrorKind::InvalidEvent, "{}", e);
    }
    Ok(())
}

/// Found by `binary_mode_headers_never_panic`: a header name with a multi-byte character
/// across the prefix's length made `binding::decode` panic (slicing inside a character).
#[test]
fn a_header_name_with_a_wide_character_at_the_prefix_length_is_ignored() {
    for style in STYLES {
        let headers = [
            ("ce\u{10000}", "x"),
            ("ce_\u{10000}", "x"),
            ("\u{10000}", "x"),
            ("ce_id", "1"),
        ];
        let result = binding::decode(headers, Bytes::new(), style);
        assert!(
            result
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::InvalidEvent),
            "{style:?}: {result:?}"
        );
    }
}

/// JSON-ish text: fragments of CloudEvents JSON in random order.
fn jsonish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("\"specversion\":\"1.0\",".to_owned()),
        Just("\"id\":".to_owned()),
        Just("\"type\":\"t\",".to_owned()),
        Just("\"source\":\"/s\",".to_owned()),
        Just("\"data_base64\":\"%%\",".to_owned()),
        Just("\"time\":\"yesterday\",".to_owned()),
        Just("\"data\":".to_owned()),
        Just("null".to_owned()),
        Just("[1,2".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        "[a-z0-9\":,{}\\[\\] ]{0,8}",
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn structured_json_from_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_event(Event::from_json_slice(&bytes))?;
    }

    #[test]
    fn structured_json_from_jsonish_text_never_panics(text in jsonish()) {
        check_event(Event::from_json(&text))?;
    }

    #[test]
    fn a_valid_event_with_one_byte_changed_never_panics(at in 0..VALID.len(), byte in any::<u8>()) {
        let mut bytes = VALID.as_bytes().to_vec();
        bytes[at] = byte;
        check_event(Event::from_json_slice(&bytes))?;
    }

    #[test]
    fn a_valid_event_cut_short_never_panics(at in 0..VALID.len()) {
        check_event(Event::from_json_slice(&VALID.as_bytes()[..at]))?;
    }

    #[test]
    fn binary_mode_headers_never_panic(
        style in 0..STYLES.len(),
        headers in proptest::collection::vec(
            (
                prop_oneof![
                    Just("ce_id".to_owned()), Just("ce-id".to_owned()), Just("ce_specversion".to_owned()),
                    Just("ce-specversion".to_owned()), Just("ce_type".to_owned()), Just("ce-source".to_owned()),
                    Just("cloudEvents_id".to_owned()), Just("cloudEvents:type".to_owned()),
                    Just("ce_time".to_owned()), Just("ce-time".to_owned()), Just("content-type".to_owned()),
                    Just("Content-Type".to_owned()), Just("ce_partitionkey".to_owned()), ".{0,12}",
                ],
                prop_oneof![Just("1.0".to_owned()), Just("%".to_owned()), Just("%zz".to_owned()),
                    Just("%C3%28".to_owned()), Just("2026-13-40T99:00:00Z".to_owned()), ".{0,16}"],
            ),
            0..10,
        ),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        check_event(binding::decode(headers, Bytes::from(body), STYLES[style]))?;
    }

    #[test]
    fn a_schema_file_of_any_content_loads_or_fails_with_a_schema_error(
        name in "[a-z]{1,8}(\\.[a-z]{1,8})?",
        content in prop_oneof![
            jsonish(),
            Just(r##"{"type":"object","$ref":"#/nope"}"##.to_owned()),
            Just(r#"{"type":"object","x-evbus-version":"one"}"#.to_owned()),
            Just(r#"{"type":"strin"}"#.to_owned()),
            Just(r#"{"$ref":"other.json"}"#.to_owned()),
            Just(r#"{"format":"no-such-format","type":"string"}"#.to_owned()),
        ],
    ) {
        let dir = std::env::temp_dir().join(format!(
            "evbus-prop-catalogue-{}-{}",
            std::process::id(),
            evbus_prop_counter()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::fs::write(dir.join(format!("{name}.json")), &content).expect("a schema file");
        // An error is a SchemaError by type; the point is that nothing panics.
        let result = Catalog::from_dir(&dir).map(|_| ());
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = result {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

fn evbus_prop_counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
