//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! A secret is `whsec_` + base64 of 32 random bytes. A delivery carries `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`: space-separated `v1,<base64>`
//! signatures, each HMAC-SHA256 with one secret's bytes over `{id}.{timestamp}.{body}`. During
//! a secret rotation the old and the new secrets both sign, so receivers can switch at their
//! own pace.

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

/// Whether `header` (a `webhook-signature` value) holds a valid signature by `secret`, compared
/// in constant time. What a receiver does; used by the tests and offered for Rust receivers.
pub fn verify(secret: &str, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
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
    fn several_secrets_sign_and_each_verifies() {
        let (a, b) = (generate_secret(), generate_secret());
        assert!(a.starts_with("whsec_"));
        let header = signature_header([a.as_str(), b.as_str()], "m1", 5, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify(&a, "m1", 5, b"{}", &header));
        assert!(verify(&b, "m1", 5, b"{}", &header));
        assert!(!verify(&generate_secret(), "m1", 5, b"{}", &header));
        assert!(!verify(&a, "m1", 6, b"{}", &header));
    }
}
