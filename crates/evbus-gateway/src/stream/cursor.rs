//! SSE ids: log positions enciphered so that they reveal neither the position nor the gaps
//! between the positions a stream sees. `encode` is a keyed permutation of the 64-bit
//! position (an 8-round Feistel network, HMAC-SHA256 as its round function) followed by a
//! 32-bit HMAC tag, written as 24 hex digits; `decode` refuses anything it did not issue.

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

/// The SSE id of log position `seq`.
pub(super) fn encode(key: &[u8], seq: i64) -> String {
    let v = seq.max(0) as u64;
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
    i64::try_from((u64::from(l) << 32) | u64::from(r)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_hide_positions_and_refuse_forgeries() {
        let key = [7u8; 32];
        for seq in [0, 1, 2, 41, 1 << 31, i64::MAX] {
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
}
