//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! A secret is `whsec_` + base64 of 32 random bytes. A delivery carries `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`: space-separated `v1,<base64>`
//! signatures, each HMAC-SHA256 with one secret's bytes over `{id}.{timestamp}.{body}`, where
//! `id` is the `webhook-id`. During a secret rotation the old and the new secrets both sign,
//! so receivers can switch at their own pace.
//!
//! The `webhook-id` is [`message_id`] of the event's `source` and `id`: unique per event (an
//! event id alone is unique only per source, and another producer may reuse it), and the
//! same on every retry and replay of the event. The body keeps the CloudEvent's own `id`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Prefix of webhook signing secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

/// The key bytes of a `whsec_` secret; `None` if it is not valid base64.
pub fn secret_bytes(secret: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .ok()
}

/// Prefix of `webhook-id` values ([`message_id`]).
pub const MESSAGE_ID_PREFIX: &str = "msg_";

/// The `webhook-id` of the event with CloudEvents `source` and `id`: `msg_` + the first 32
/// hex digits (128 bits) of SHA-256 over the length of `source` in bytes (8 bytes, big
/// endian), `source`, then `id`. The length prefix keeps every (`source`, `id`) pair apart
/// (`("/a", "b/c")` and `("/a/b", "c")` differ). The same event always gets the same id, on
/// every retry and replay and on every gateway instance; two events differing in `source` or
/// `id` get different ones.
pub fn message_id(source: &str, id: &str) -> String {
    use sha2::Digest;
    let mut hash = Sha256::new();
    hash.update((source.len() as u64).to_be_bytes());
    hash.update(source.as_bytes());
    hash.update(id.as_bytes());
    let digest = hash.finalize();
    format!("{MESSAGE_ID_PREFIX}{}", hex::encode(&digest[..16]))
}

/// One `v1,<base64>` signature of `body` for message `id` at `timestamp` with `secret`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = secret_bytes(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The `webhook-signature` header value: one signature per secret, space separated.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a str>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .filter_map(|s| sign(s, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How far a delivery's `webhook-timestamp` may be from the receiver's clock, either way,
/// for [`verify`] to accept it (the Standard Webhooks recommendation). Each attempt is signed
/// when it is sent, so a genuine delivery is well inside it; a captured one replayed later is
/// not.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// Whether a delivery is genuine and fresh: `header` (a `webhook-signature` value) holds a
/// valid signature by `secret` (compared in constant time), and `timestamp` (the
/// `webhook-timestamp` value) is within [`TIMESTAMP_TOLERANCE_SECS`] of this machine's clock,
/// so a delivery captured and sent again later is refused. What a receiver does; offered for
/// Rust receivers. Deduplicate by `webhook-id` as well: a retry or a replay is a new, fresh
/// delivery of the same event, with the same `webhook-id` ([`message_id`]), and two different
/// events never share one.
pub fn verify(secret: &str, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    verify_at(secret, id, timestamp, body, header, now)
}

/// [`verify`] against the clock reading `now` (Unix seconds) instead of this machine's clock.
pub fn verify_at(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now: i64,
) -> bool {
    now.abs_diff(timestamp) <= TIMESTAMP_TOLERANCE_SECS.unsigned_abs()
        && signature_matches(secret, id, timestamp, body, header)
}

/// Whether `header` holds a valid signature by `secret` over `id`, `timestamp` and `body`,
/// whatever the timestamp.
fn signature_matches(secret: &str, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(key) = secret_bytes(secret) else {
        return false;
    };
    header.split(' ').any(|sig| {
        let Some(b64) = sig.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(b64) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
            return false;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks reference implementations.
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let ts = 1614265330;
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, id, ts, body).unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_message_id_tells_every_source_and_id_apart() {
        let a = message_id("/t", "wh-1");
        assert_eq!(a, message_id("/t", "wh-1"), "stable");
        // The documented construction, as another language computes it (Python's hashlib:
        // sha256(struct.pack(">Q", len(source)) + source + id).hexdigest()[:32]).
        assert_eq!(a, "msg_4b6f3da3e18f6735137390e3a1f85c3f");
        assert!(a.starts_with("msg_") && a.len() == 4 + 32, "{a}");
        assert!(a[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, message_id("/attacker", "wh-1"));
        assert_ne!(a, message_id("/t", "wh-2"));
        assert_ne!(message_id("/a", "b/c"), message_id("/a/b", "c"));
        assert_ne!(message_id("", "ab"), message_id("a", "b"));
    }

    #[test]
    fn several_secrets_sign_and_each_verifies() {
        let (a, b) = (generate_secret(), generate_secret());
        assert!(a.starts_with("whsec_"));
        let header = signature_header([a.as_str(), b.as_str()], "m1", 5, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify_at(&a, "m1", 5, b"{}", &header, 5));
        assert!(verify_at(&b, "m1", 5, b"{}", &header, 5));
        assert!(!verify_at(&generate_secret(), "m1", 5, b"{}", &header, 5));
        assert!(!verify_at(&a, "m1", 6, b"{}", &header, 6));
    }

    #[test]
    fn a_signature_outside_the_timestamp_tolerance_is_refused() {
        let secret = generate_secret();
        let now = 1_800_000_000;
        let tolerance = TIMESTAMP_TOLERANCE_SECS;
        for (signed_at, fresh) in [
            (now, true),
            (now - tolerance, true),
            (now + tolerance, true),
            (now - tolerance - 1, false),
            (now + tolerance + 1, false),
            (now - 3600, false),
            (i64::MIN, false),
            (i64::MAX, false),
        ] {
            let header = signature_header([secret.as_str()], "m1", signed_at, b"{}");
            assert_eq!(
                verify_at(&secret, "m1", signed_at, b"{}", &header, now),
                fresh,
                "signed at {signed_at}, checked at {now}"
            );
        }
        // The machine's clock: a delivery signed now verifies, one signed an hour ago not.
        let now = chrono::Utc::now().timestamp();
        let header = signature_header([secret.as_str()], "m1", now, b"{}");
        assert!(verify(&secret, "m1", now, b"{}", &header));
        let header = signature_header([secret.as_str()], "m1", now - 3600, b"{}");
        assert!(!verify(&secret, "m1", now - 3600, b"{}", &header));
    }
}
