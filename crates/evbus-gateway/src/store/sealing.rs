//! Webhook signing secrets sealed at rest.
//!
//! HMAC signing needs the secret itself, so a store cannot keep only a hash of it as it does
//! for API keys. With a [`SecretsKey`] (32 bytes given to the gateway from outside its data
//! directory, e.g. `EVBUS_SECRETS_KEY`), a store seals every signing secret with
//! AES-256-GCM before writing it: `sealed:v1:` + base64(nonce ‖ ciphertext ‖ tag), with the
//! webhook id as associated data, so a sealed value copied to another webhook's row does not
//! open. A stolen database file then holds no usable secret without the key. Values written
//! before a key was set stay readable and are sealed when the store opens with the key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::StoreError;

/// The prefix of a sealed value.
const PREFIX: &str = "sealed:v1:";

/// The key that seals webhook signing secrets at rest (AES-256-GCM).
pub struct SecretsKey {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

impl SecretsKey {
    /// A key from its text form: 32 bytes as base64 (44 characters) or hex (64). The error
    /// says what is wrong without quoting the value.
    pub fn from_text(text: &str) -> Result<SecretsKey, StoreError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            STANDARD.decode(text).ok()
        };
        match bytes {
            Some(bytes) if bytes.len() == 32 => Self::from_bytes(&bytes),
            Some(bytes) => Err(StoreError(format!(
                "the secrets key must be 32 bytes; this one is {} (make one with `openssl rand -base64 32`)",
                bytes.len()
            ))),
            None => Err(StoreError(
                "the secrets key is neither base64 nor 64 hex digits (make one with `openssl rand -base64 32`)"
                    .into(),
            )),
        }
    }

    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SecretsKey, StoreError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| StoreError("the secrets key must be 32 bytes".into()))?;
        Ok(SecretsKey {
            key: LessSafeKey::new(key),
            random: SystemRandom::new(),
        })
    }

    /// Seals `secret` of webhook `webhook_id`.
    pub(crate) fn seal(&self, webhook_id: &str, secret: &str) -> Result<String, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| StoreError("no randomness for a nonce".into()))?;
        let mut data = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(webhook_id.as_bytes()),
                &mut data,
            )
            .map_err(|_| StoreError("sealing a webhook secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}{}", STANDARD.encode(out)))
    }

    /// Opens a value [`seal`](Self::seal)ed for `webhook_id`.
    fn open(&self, webhook_id: &str, sealed: &str) -> Result<String, StoreError> {
        let wrong = || {
            StoreError(
                "a sealed webhook secret does not open with this secrets key: start the gateway with the key that sealed it".into(),
            )
        };
        let raw = STANDARD.decode(sealed).map_err(|_| wrong())?;
        if raw.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(webhook_id.as_bytes()), &mut data)
            .map_err(|_| wrong())?;
        String::from_utf8(plain.to_vec()).map_err(|_| wrong())
    }
}

/// Whether a stored value is sealed.
pub(crate) fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// The secret a stored value holds: opened with `key` if sealed, as is if not.
pub(crate) fn open(
    key: Option<&SecretsKey>,
    webhook_id: &str,
    stored: String,
) -> Result<String, StoreError> {
    let Some(sealed) = stored.strip_prefix(PREFIX) else {
        return Ok(stored);
    };
    match key {
        Some(key) => key.open(webhook_id, sealed),
        None => Err(StoreError(
            "webhook secrets in this store are sealed: start the gateway with the secrets key that sealed them (EVBUS_SECRETS_KEY)".into(),
        )),
    }
}

/// The value to store for `secret`: sealed with `key`, as is without one.
pub(crate) fn seal(
    key: Option<&SecretsKey>,
    webhook_id: &str,
    secret: &str,
) -> Result<String, StoreError> {
    match key {
        Some(key) => key.seal(webhook_id, secret),
        None => Ok(secret.to_owned()),
    }
}

/// Opens a stored webhook's secrets (current and previous) in place.
pub(crate) fn open_webhook(
    key: Option<&SecretsKey>,
    w: &mut crate::store::WebhookRecord,
) -> Result<(), StoreError> {
    w.secret = open(key, &w.id, std::mem::take(&mut w.secret))?;
    w.previous_secret = match w.previous_secret.take() {
        Some(p) => Some(open(key, &w.id, p)?),
        None => None,
    };
    Ok(())
}

/// [`seal`] of an optional secret.
pub(crate) fn seal_opt(
    key: Option<&SecretsKey>,
    webhook_id: &str,
    secret: Option<&str>,
) -> Result<Option<String>, StoreError> {
    secret.map(|s| seal(key, webhook_id, s)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_webhook() {
        let key = SecretsKey::from_bytes(&[7u8; 32]).unwrap();
        let sealed = seal(Some(&key), "wh_1", "whsec_abc").unwrap();
        assert!(
            is_sealed(&sealed) && !sealed.contains("whsec_abc"),
            "{sealed}"
        );
        assert_eq!(
            open(Some(&key), "wh_1", sealed.clone()).unwrap(),
            "whsec_abc"
        );
        // Two seals of one secret differ (random nonce).
        assert_ne!(seal(Some(&key), "wh_1", "whsec_abc").unwrap(), sealed);
        // Another webhook's row, another key, no key, a changed byte: refused.
        assert!(open(Some(&key), "wh_2", sealed.clone()).is_err());
        let other = SecretsKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(open(Some(&other), "wh_1", sealed.clone()).is_err());
        let e = open(None, "wh_1", sealed.clone()).unwrap_err();
        assert!(e.0.contains("EVBUS_SECRETS_KEY"), "{e}");
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(open(Some(&key), "wh_1", String::from_utf8(bytes).unwrap()).is_err());
        // Clear values (written before a key was set) read as they are.
        assert_eq!(
            open(Some(&key), "wh_1", "whsec_x".into()).unwrap(),
            "whsec_x"
        );
    }

    #[test]
    fn keys_are_32_bytes_of_base64_or_hex_and_errors_do_not_quote_them() {
        assert!(SecretsKey::from_text(&STANDARD.encode([1u8; 32])).is_ok());
        assert!(SecretsKey::from_text(&hex::encode([1u8; 32])).is_ok());
        let e = SecretsKey::from_text(&STANDARD.encode([1u8; 16])).unwrap_err();
        assert!(e.0.contains("32 bytes") && e.0.contains("16"), "{e}");
        let e = SecretsKey::from_text("not a key, QZX").unwrap_err();
        assert!(!e.0.contains("QZX"), "{e}");
    }
}
