//! A rolling deploy, as separate processes on the local Redis: producers on version 2 and
//! consumers on version 1, and the reverse, under BACKWARD, FORWARD and FULL. Each case runs
//! `evbus emit` with one catalogue directory and `evbus consume` with another, then `evbus dlq
//! list`, under a Redis key prefix of its own. docs/schema-evolution.md tabulates what each
//! side sees; these tests are that table.

mod rolling;
mod support;

use std::path::Path;

use rolling::{catalogue, cleanup, consume, dlq_list, emit, redis};
use serde_json::{Value, json};

/// One case: `payloads` emitted with `producer`, consumed with `consumer` (group `g`);
/// `handled` are the indexes of the payloads the handler must get, `dead` the indexes that
/// must be dead-lettered with a reason starting with the given text.
async fn case(
    name: &str,
    ty: &str,
    producer: &Path,
    consumer: &Path,
    payloads: &[Value],
    handled: &[usize],
    dead: &[(usize, &str)],
) {
    let Some(url) = redis(name).await else {
        return;
    };
    let ids = emit(&url, producer, ty, payloads);
    assert_eq!(ids.len(), payloads.len());
    // The handled events come last in each case, and `consume` handles one event at a time
    // in stream order, so once it has handled them it has also dead-lettered the others.
    let seen = consume(&url, consumer, ty, "g", handled.len());
    assert_eq!(seen.code, Some(0), "{name}: {}", seen.stderr);
    let want: Vec<String> = handled.iter().map(|i| ids[*i].clone()).collect();
    assert_eq!(seen.handled_ids(), want, "{name}: handled\n{}", seen.stderr);
    let want_dead: Vec<String> = dead.iter().map(|(i, _)| ids[*i].clone()).collect();
    assert_eq!(seen.dead_ids(), want_dead, "{name}: reported on stderr");
    for ((_, reason), (_, start)) in seen.dead_lettered.iter().zip(dead) {
        assert!(reason.starts_with(start), "{name}: {reason}");
    }
    // The dead-letter queue holds exactly those, with the same reason.
    let listed = dlq_list(&url, ty, "g");
    let listed_ids: Vec<String> = listed.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(listed_ids, want_dead, "{name}: dlq list");
    for ((_, reason, attempts), (_, start)) in listed.iter().zip(dead) {
        assert!(reason.starts_with(start), "{name}: {reason}");
        assert_eq!(*attempts, 1, "{name}: rejected on the first delivery");
    }
    // Each handled event arrives as its producer wrote it.
    for e in &seen.handled {
        assert_eq!(e["type"], ty);
    }
    cleanup(&url, ty, &["g"]).await;
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const NEWER: &str = "rejected on consume: event type \"";

/// BACKWARD, the case: `afterProductUpdate` of the example catalogue gets an optional
/// property in version 2. A v1 consumer handles every v2 event valid under v1 and
/// dead-letters only those that use the new property, saying to deploy consumers first.
#[tokio::test(flavor = "multi_thread")]
async fn backward_optional_property_added_to_a_closed_model() {
    let ty = "afterProductUpdate";
    let examples = support::schemas();
    let v1 = read(&examples.join(format!("events/{ty}.json")));
    let mut v2 = v1.clone();
    v2["properties"]["changedFields"] = json!({"type": "array", "items": {"type": "string"}});

    let dir_v1 = support::temp_dir("backward-v1");
    support::copy_dir(&examples.join("definitions"), &dir_v1.join("definitions"));
    rolling::write(&dir_v1.join(format!("events/{ty}.json")), &v1);
    // v2 with its history, and v2 alone (a catalogue that dropped version 1).
    let dir_v2 = catalogue("backward-v2", ty, &v2, &[&v1]);
    support::copy_dir(&examples.join("definitions"), &dir_v2.join("definitions"));
    let mut v2_alone = v2.clone();
    v2_alone["x-evbus-version"] = json!(2);
    let dir_v2_alone = catalogue("backward-v2-alone", ty, &v2_alone, &[]);
    support::copy_dir(
        &examples.join("definitions"),
        &dir_v2_alone.join("definitions"),
    );

    let product = json!({"_id": "p-1", "shopId": "s-1", "title": "Mug", "isVisible": true});
    let plain = json!({"productId": "p-1", "product": product});
    let changed = json!({"productId": "p-1", "product": product, "changedFields": ["title"]});

    // The case alone: nothing is dead-lettered.
    case(
        "backward-v2-to-v1-valid",
        ty,
        &dir_v2,
        &dir_v1,
        &[plain.clone(), plain.clone()],
        &[0, 1],
        &[],
    )
    .await;
    case(
        "backward-v2-to-v1",
        ty,
        &dir_v2,
        &dir_v1,
        &[changed.clone(), plain.clone()],
        &[1],
        &[(
            0,
            "rejected on consume: event type \"afterProductUpdate\" version 2 is newer than this \
             consumer's catalogue (versions: 1), and its data is not valid under version 1",
        )],
    )
    .await;
    case(
        "backward-v1-to-v2",
        ty,
        &dir_v1,
        &dir_v2,
        std::slice::from_ref(&plain),
        &[0],
        &[],
    )
    .await;
    case(
        "backward-v1-to-v2-alone",
        ty,
        &dir_v1,
        &dir_v2_alone,
        std::slice::from_ref(&plain),
        &[0],
        &[],
    )
    .await;
}

/// `{productId, price}` with the given content model, and the same plus `color: string`.
fn pair(model: Option<Value>, mode: &str) -> (Value, Value) {
    let mut v1 = json!({
        "type": "object",
        "x-evbus-compatibility": mode,
        "properties": {"productId": {"type": "string"}, "price": {"type": "number"}},
        "required": ["productId"]
    });
    if let Some(m) = model {
        v1["additionalProperties"] = m;
    }
    let mut v2 = v1.clone();
    v2["properties"]["color"] = json!({"type": "string"});
    (v1, v2)
}

/// FORWARD: an optional property added to an open model. Old consumers read everything new
/// producers write; a consumer whose catalogue dropped version 1 refuses old data that used
/// the name with another type, and says to keep the version.
#[tokio::test(flavor = "multi_thread")]
async fn forward_optional_property_added_to_an_open_model() {
    let ty = "productChanged";
    let (v1, v2) = pair(None, "FORWARD");
    let dir_v1 = catalogue("forward-v1", ty, &v1, &[]);
    let dir_v2 = catalogue("forward-v2", ty, &v2, &[&v1]);
    let mut v2_alone = v2.clone();
    v2_alone["x-evbus-version"] = json!(2);
    let dir_v2_alone = catalogue("forward-v2-alone", ty, &v2_alone, &[]);
    let plain = json!({"productId": "p-1", "price": 3});
    let colored = json!({"productId": "p-1", "color": "red"});
    let odd = json!({"productId": "p-1", "color": 5});

    case(
        "forward-v2-to-v1",
        ty,
        &dir_v2,
        &dir_v1,
        &[colored.clone(), plain.clone()],
        &[0, 1],
        &[],
    )
    .await;
    case(
        "forward-v1-to-v2",
        ty,
        &dir_v1,
        &dir_v2,
        &[odd.clone(), plain.clone()],
        &[0, 1],
        &[],
    )
    .await;
    case(
        "forward-v1-to-v2-alone",
        ty,
        &dir_v1,
        &dir_v2_alone,
        &[odd.clone(), plain.clone()],
        &[1],
        &[(
            0,
            "rejected on consume: event type \"productChanged\" version 1 is not in this \
             consumer's catalogue (versions: 2), and its data is not valid under version 2",
        )],
    )
    .await;
}

/// FULL: a property added to a partially open model whose undeclared properties must be
/// strings, with the schema those had. Nothing is dead-lettered in either direction.
#[tokio::test(flavor = "multi_thread")]
async fn full_property_added_to_a_partially_open_model() {
    let ty = "productChanged";
    let (v1, v2) = pair(Some(json!({"type": "string"})), "FULL");
    let dir_v1 = catalogue("full-v1", ty, &v1, &[]);
    let dir_v2 = catalogue("full-v2", ty, &v2, &[&v1]);
    let mut v2_alone = v2.clone();
    v2_alone["x-evbus-version"] = json!(2);
    let dir_v2_alone = catalogue("full-v2-alone", ty, &v2_alone, &[]);
    let plain = json!({"productId": "p-1", "price": 3});
    let colored = json!({"productId": "p-1", "color": "red"});
    let noted = json!({"productId": "p-1", "color": "blue", "note": "v1 data"});

    case(
        "full-v2-to-v1",
        ty,
        &dir_v2,
        &dir_v1,
        &[colored.clone(), plain.clone()],
        &[0, 1],
        &[],
    )
    .await;
    case(
        "full-v1-to-v2",
        ty,
        &dir_v1,
        &dir_v2,
        &[noted.clone(), plain.clone()],
        &[0, 1],
        &[],
    )
    .await;
    case(
        "full-v1-to-v2-alone",
        ty,
        &dir_v1,
        &dir_v2_alone,
        &[noted.clone(), plain.clone()],
        &[0, 1],
        &[],
    )
    .await;
}

/// The same changes are refused at load under the modes they break, so the table above is
/// per mode for a reason.
#[test]
fn each_change_is_refused_under_a_mode_it_breaks() {
    for (model, mode, rule) in [
        (None, "BACKWARD", "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL"),
        (
            Some(json!(false)),
            "FORWARD",
            "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
        ),
        (
            Some(json!(false)),
            "FULL",
            "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
        ),
        (None, "FULL", "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL"),
    ] {
        let (v1, v2) = pair(model, mode);
        let dir = catalogue("refused", "productChanged", &v2, &[&v1]);
        let out = support::evbus(&["events", "list", "--schemas", dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{mode}");
        let err = support::text(&out.stderr);
        assert!(
            err.contains(&format!("is not {mode} compatible with v1")),
            "{err}"
        );
        assert!(err.contains(rule), "{mode}: {err}");
    }
    let _ = NEWER;
}
