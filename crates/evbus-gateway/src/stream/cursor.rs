//! SSE ids: log positions enciphered so that they reveal neither the position nor the gaps
//! between the positions a stream sees. `encode` is a keyed permutation of the 64-bit
//! position (an 8-round Feistel network, HMAC-SHA256 as its round function) followed by a
//! 32-bit HMAC tag, written as 24 hex digits; `decode` refuses anything it did not issue.
//!
//! The permuted value is the position in its low [`POSITION_BITS`] bits and, for the id a
//! stream sends first ([`encode_fresh`]), a random nonce above them: that id names the
//! position the stream starts from, and without the nonce two streams opened moments apart
//! would get the same id exactly when no event of any type was logged in between (an oracle
//! of other types' traffic for a key that sees none of it).

use hmac::{Hmac, Mac};
use sha2::Sha256;

const ROUNDS: u8 = 8;
const TAG: u8 = 0xff;

fn prf(key: &[u8], label: u8, data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(&[label]);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn round(key: &[u8], i: u8, half: u32) -> u32 {
    let out = prf(key, i, &half.to_be_bytes());
    u32::from_be_bytes([out[0], out[1], out[2], out[3]])
}

fn tag(key: &[u8], block: u64) -> u32 {
    let out = prf(key, TAG, &block.to_be_bytes());
    u32::from_be_bytes([out[0], out[1], out[2], out[3]])
}

/// The bits of a permuted value that hold the log position (positions up to 1.4 × 10^14).
const POSITION_BITS: u32 = 47;
const POSITION_MASK: u64 = (1 << POSITION_BITS) - 1;

/// The SSE id of log position `seq` (the same id for the same position: an event's id).
pub(super) fn encode(key: &[u8], seq: i64) -> String {
    permute(key, seq.max(0) as u64 & POSITION_MASK)
}

/// An SSE id of log position `seq` that differs from every other id of it (a random nonce
/// in the bits above the position): the id a stream sends before its first event.
pub(super) fn encode_fresh(key: &[u8], seq: i64) -> String {
    let nonce = u64::from(rand::random::<u16>()) << POSITION_BITS;
    permute(key, nonce | (seq.max(0) as u64 & POSITION_MASK))
}

fn permute(key: &[u8], v: u64) -> String {
    let (mut l, mut r) = ((v >> 32) as u32, v as u32);
    for i in 0..ROUNDS {
        (l, r) = (r, l ^ round(key, i, r));
    }
    let block = (u64::from(l) << 32) | u64::from(r);
    format!("{block:016x}{:08x}", tag(key, block))
}

/// The log position of an SSE id issued by [`encode`] with the same key.
pub(super) fn decode(key: &[u8], id: &str) -> Option<i64> {
    if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let block = u64::from_str_radix(&id[..16], 16).ok()?;
    let given = u32::from_str_radix(&id[16..], 16).ok()?;
    let expected = tag(key, block);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&given, &expected)) {
        return None;
    }
    let (mut l, mut r) = ((block >> 32) as u32, block as u32);
    for i in (0..ROUNDS).rev() {
        (l, r) = (r ^ round(key, i, l), l);
    }
    i64::try_from(((u64::from(l) << 32) | u64::from(r)) & POSITION_MASK).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_hide_positions_and_refuse_forgeries() {
        let key = [7u8; 32];
        for seq in [0, 1, 2, 41, 1 << 31, POSITION_MASK as i64] {
            let id = encode(&key, seq);
            assert_eq!(decode(&key, &id), Some(seq), "{id}");
            assert!(!id.contains(&seq.to_string()) || seq < 10, "{id}");
        }
        // Neighbouring positions give unrelated ids.
        let (a, b) = (encode(&key, 100), encode(&key, 101));
        let same = a
            .bytes()
            .zip(b.bytes())
            .take(16)
            .filter(|(x, y)| x == y)
            .count();
        assert!(same < 10, "{a} {b}");
        // Another key, a changed digit, a number: refused.
        assert_eq!(decode(&[8u8; 32], &a), None);
        let mut forged = a.clone().into_bytes();
        forged[3] = if forged[3] == b'0' { b'1' } else { b'0' };
        assert_eq!(decode(&key, std::str::from_utf8(&forged).unwrap()), None);
        assert_eq!(decode(&key, "100"), None);
    }

    #[test]
    fn fresh_ids_name_the_same_position_and_never_repeat() {
        let key = [7u8; 32];
        let ids: std::collections::HashSet<String> =
            (0..64).map(|_| encode_fresh(&key, 41)).collect();
        // 64 draws of a 16-bit nonce: a repeat has odds of about 3 %; 60 distinct is far
        // beyond what a deterministic id (1 distinct) gives.
        assert!(ids.len() >= 60, "{} distinct of 64", ids.len());
        for id in &ids {
            assert_eq!(decode(&key, id), Some(41), "{id}");
        }
        // The largest position survives both encodings.
        let top = POSITION_MASK as i64;
        assert_eq!(decode(&key, &encode(&key, top)), Some(top));
        assert_eq!(decode(&key, &encode_fresh(&key, top)), Some(top));
    }
}
