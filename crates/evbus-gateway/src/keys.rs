//! API keys: generation, parsing, hashing, constant-time checks and scopes.
//!
//! A key reads `evb_<id>_<secret>`: `evb_` makes it recognisable (secret scanners, logs),
//! `<id>` (16 hex digits, public) finds its record, `<secret>` (64 hex digits, 256 random
//! bits) proves possession. Only SHA-256 of the secret is stored; a presented secret is hashed
//! and compared in constant time. A high-entropy secret needs no slow password hash: nobody
//! can brute-force 2^256 candidates, so a fast hash is enough and keeps authentication cheap.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The recognisable prefix of every API key.
pub const KEY_PREFIX: &str = "evb_";

/// A freshly generated API key: shown once, never stored.
#[derive(Clone)]
pub struct NewKey {
    id: String,
    secret: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl NewKey {
    /// A new random key (64-bit public id, 256-bit secret) from `rand`'s cryptographically
    /// secure thread generator (ChaCha, seeded by the operating system).
    pub fn generate() -> NewKey {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        let mut rng = rand::rng();
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        NewKey {
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    /// The public lookup id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full key to hand to its user: `evb_<id>_<secret>`.
    pub fn expose(&self) -> String {
        format!("{KEY_PREFIX}{}_{}", self.id, self.secret)
    }

    /// The public prefix, safe to list: `evb_<id>`.
    pub fn prefix(&self) -> String {
        display_prefix(&self.id)
    }

    /// SHA-256 of the secret: the only thing stored.
    pub fn secret_hash(&self) -> Vec<u8> {
        hash_secret(&self.secret)
    }
}

/// The public prefix of the key with id `id`: `evb_<id>`.
pub fn display_prefix(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

/// A presented key split into its lookup id and secret; `None` if it is not shaped like a key.
pub fn parse(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexish = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexish(id, 16) && hexish(secret, 64)).then_some((id, secret))
}

/// SHA-256 of a presented secret.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Whether `secret` matches the stored hash, compared in constant time.
pub fn verify(secret: &str, stored_hash: &[u8]) -> bool {
    let presented = hash_secret(secret);
    presented.len() == stored_hash.len() && bool::from(presented.ct_eq(stored_hash))
}

/// Whether the event type `ty` matches a scope pattern: an exact name, `*` (everything), or a
/// name with `*` wildcards standing for any run of characters (`afterOrder*`).
///
/// Scopes never reach internal event types: callers check visibility first (see
/// [`crate::Visibility`]).
pub fn pattern_matches(pattern: &str, ty: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == ty;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !ty.starts_with(first) || ty.len() < first.len() + last.len() || !ty.ends_with(last) {
        return false;
    }
    let mut rest = &ty[first.len()..ty.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether any pattern of `scope` matches `ty`.
pub fn scope_allows(scope: &[String], ty: &str) -> bool {
    scope.iter().any(|p| pattern_matches(p, ty))
}

/// Whether `pattern` is acceptable in a scope: non-empty, at most 200 characters of ASCII
/// letters, digits, `.`, `_`, `-` and `*`.
pub fn is_valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 200
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*'))
}

/// Longest source pattern of a key: the longest `source` a publish may carry.
pub const MAX_SOURCE_PATTERN_LEN: usize = 2048;

/// The most patterns one list of a key holds (`subscribe`, `publish`, `sources`): each
/// publish or subscription checks a list on the request path, so its length is CPU per
/// request.
pub const MAX_PATTERNS: usize = 100;

/// Whether `c` is an invisible formatting character that makes a text read as another one:
/// the soft hyphen, zero-width characters and joiners, directional marks, embeddings,
/// overrides and isolates, word joiners and invisible operators, and the byte order mark
/// (most of Unicode's `Cf` category). Refused in sources, as control characters are: a
/// source is shown to people (logs, portals, receivers), and `/shop/\u{202e}nimda` must not
/// pass for another.
pub fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00ad}'
        | '\u{061c}'
        | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}')
}

/// Whether `pattern` is acceptable among a key's `sources`: 1 to [`MAX_SOURCE_PATTERN_LEN`]
/// characters, none of them a control character or an invisible formatting one
/// ([`is_invisible_format`]). `*` stands for any run of characters, as
/// in a scope ([`pattern_matches`]); everything else matches itself (a source is a URI
/// reference, so `/`, `:`, `,` and `.` are plain characters).
pub fn is_valid_source_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.chars().count() <= MAX_SOURCE_PATTERN_LEN
        && !pattern
            .chars()
            .any(|c| c.is_control() || is_invisible_format(c))
}

/// Why a new key's `sources` are refused, if they are: a key that may publish must be bound
/// to at least one source pattern, and every pattern must be valid
/// ([`is_valid_source_pattern`]). A key without publish scopes needs none.
///
/// A publish is accepted only under a `source` one of its key's patterns matches, so a key
/// cannot publish as another producer: it can neither claim another producer's (`source`,
/// `id`) before that producer does, nor learn from a 409 which ids another producer used.
pub fn check_sources(publish: &[String], sources: &[String]) -> Result<(), String> {
    if !publish.is_empty() && sources.is_empty() {
        return Err(
            "a key that may publish needs at least one source pattern (`sources`, or \
             `evbus keys create --source`): the CloudEvents `source` values its events may \
             carry, such as `/shop` or `https://shop.example/*`; `*` allows any source"
                .to_owned(),
        );
    }
    if sources.len() > MAX_PATTERNS {
        return Err(format!(
            "`sources` holds more than {MAX_PATTERNS} source patterns; use `*` patterns"
        ));
    }
    if sources.iter().any(|p| !is_valid_source_pattern(p)) {
        return Err(format!(
            "a source pattern must be 1 to {MAX_SOURCE_PATTERN_LEN} characters without control \
             or invisible formatting characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let key = NewKey::generate();
        let exposed = key.expose();
        assert!(exposed.starts_with("evb_"));
        let (id, secret) = parse(&exposed).unwrap();
        assert_eq!(id, key.id());
        assert!(verify(secret, &key.secret_hash()));
        assert!(!verify(&"0".repeat(64), &key.secret_hash()));
        assert_ne!(NewKey::generate().expose(), exposed);
        assert!(!format!("{key:?}").contains(secret));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "evb_",
            "evb_abc_def",
            "xyz_0123456789abcdef_00",
            "Bearer x",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "afterOrderCreate"));
        assert!(pattern_matches("afterOrder*", "afterOrderCreate"));
        assert!(pattern_matches("after*Create", "afterOrderCreate"));
        assert!(pattern_matches("*Create", "afterOrderCreate"));
        assert!(!pattern_matches("afterProduct*", "afterOrderCreate"));
        assert!(!pattern_matches("afterOrderCreat", "afterOrderCreate"));
        assert!(pattern_matches("a*b*c", "aXbYc"));
        assert!(!pattern_matches("a*b*c", "aXcYb"));
        assert!(!pattern_matches("ab*ba", "aba"));
    }

    #[test]
    fn source_patterns() {
        let sources = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // A source is matched whole: `/shop` is not `/shop/eu` nor `/shopping`.
        assert!(scope_allows(&sources(&["/shop"]), "/shop"));
        assert!(!scope_allows(&sources(&["/shop"]), "/shop/eu"));
        assert!(!scope_allows(&sources(&["/shop"]), "/shopping"));
        assert!(scope_allows(&sources(&["/shop/*"]), "/shop/eu"));
        assert!(!scope_allows(&sources(&["/shop/*"]), "/shopping"));
        assert!(scope_allows(
            &sources(&["https://a.example/x,y", "urn:b:*"]),
            "urn:b:1"
        ));
        assert!(scope_allows(&sources(&["*"]), "anything at all"));
        assert!(!scope_allows(&[], "/shop"));

        let publish = sources(&["orderPlaced"]);
        assert!(check_sources(&[], &[]).is_ok());
        assert!(check_sources(&publish, &sources(&["/shop"])).is_ok());
        let missing = check_sources(&publish, &[]).unwrap_err();
        assert!(missing.contains("at least one source"), "{missing}");
        for bad in [
            "",
            "/shop\n",
            "/a\u{7f}",
            "/shop/\u{202e}nimda",
            "/sh\u{200b}op",
        ] {
            assert!(
                check_sources(&publish, &sources(&[bad])).is_err(),
                "{bad:?}"
            );
        }
        let long = "s".repeat(MAX_SOURCE_PATTERN_LEN + 1);
        assert!(check_sources(&publish, &[long]).is_err());
        assert!(check_sources(&publish, &["é".repeat(MAX_SOURCE_PATTERN_LEN)]).is_ok());
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("/s{i}")).collect();
        assert!(check_sources(&publish, &many).is_err());
        assert!(check_sources(&publish, &many[..MAX_PATTERNS]).is_ok());
    }
}
