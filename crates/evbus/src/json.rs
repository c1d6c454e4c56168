//! Writing event data as JSON: exactly the bytes `serde_json` writes, with the strings that
//! need no escaping copied whole.
//!
//! `serde_json` looks up every byte of a string in its escape table before it writes it,
//! about nine instructions a byte (`cargo xtask bench --callgrind`, `emit-handle`: 2,300 of
//! the 10,200 instructions of an event with a 250-byte string), and no `Formatter` hook
//! replaces that scan. Here every string is first checked a block of bytes at a time; one with
//! nothing to escape (no control character, `"` or `\`) is copied in one go, and any other
//! is written by `serde_json` as before.
//!
//! Everything else is `serde_json`'s own code: [`Fast`] forwards every call to the
//! `serde_json` serializer it wraps, wrapping the values nested in it so that their strings
//! are checked too. For a string it lets `serde_json` write an empty one (`""`, which places
//! the separators and the key exactly as for any string) and puts the text between the two
//! quotes. `serde_json`'s private values (a `RawValue`) are handed over untouched.

use std::cell::RefCell;
use std::fmt::Display;
use std::io;

use serde::ser::{self, Error as _, Serialize, Serializer};

/// The names `serde_json` gives its own values (`RawValue`, arbitrary-precision numbers), whose
/// strings are not strings: they are written as they are.
const SERDE_JSON_PRIVATE: &str = "$serde_json::private::";

/// Strings shorter than this are left to `serde_json`: its byte-by-byte scan costs less than
/// the fast path's fixed part.
const FAST_FROM: usize = 24;

/// Appends `value`'s JSON to `out`: the bytes `serde_json::to_writer` would append.
pub(crate) fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> serde_json::Result<()> {
    let sink = RefCell::new(std::mem::take(out));
    let written = {
        let mut serializer = serde_json::Serializer::new(Sink(&sink));
        value.serialize(Fast {
            inner: &mut serializer,
            sink: &sink,
        })
    };
    *out = sink.into_inner();
    written
}

/// The buffer both `serde_json` and [`Fast`] write to.
struct Sink<'a>(&'a RefCell<Vec<u8>>);

impl io::Write for Sink<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `bytes` hold anything JSON must escape: a byte below 0x20, `"` or `\` (what
/// `serde_json`'s escape table marks).
///
/// In blocks checked without an early exit inside a block, which the compiler turns into a
/// few vector compares (SSE2, in every x86-64); the last block overlaps the one before it
/// instead of leaving a remainder to go through byte by byte. The block grows with the
/// string: per call (callgrind, a standalone loop over strings with nothing to escape) 41
/// instructions at 16 bytes and 61 at 24 where a byte-by-byte scan took 184 and 272, 199 at
/// 250 bytes where 32-byte blocks took 266, 739 at 1,000 bytes (1,034).
fn needs_escape(bytes: &[u8]) -> bool {
    match bytes.len() {
        0..16 => bytes.iter().any(|&b| escaped(b)),
        16..32 => any_escaped_marking::<16>(bytes),
        32..64 => any_escaped_marking::<32>(bytes),
        _ => any_escaped_folding::<64>(bytes),
    }
}

/// A byte JSON escapes.
fn escaped(b: u8) -> bool {
    (b < 0x20) | (b == b'"') | (b == b'\\')
}

/// [`needs_escape`] for at least `N` bytes: each block's bytes marked, the marks compared
/// with none at once (the faster of the two below 64 bytes).
fn any_escaped_marking<const N: usize>(bytes: &[u8]) -> bool {
    in_blocks::<N>(bytes, |block| {
        let mut marks = [0u8; N];
        for (mark, &b) in marks.iter_mut().zip(block) {
            *mark = if escaped(b) { 0xff } else { 0 };
        }
        marks != [0; N]
    })
}

/// [`needs_escape`] for at least `N` bytes: each block's bytes folded into one flag (the
/// faster of the two from 64 bytes on).
fn any_escaped_folding<const N: usize>(bytes: &[u8]) -> bool {
    in_blocks::<N>(bytes, |block| {
        block.iter().fold(0u8, |any, &b| any | u8::from(escaped(b))) != 0
    })
}

/// Whether `found` holds for a block of `bytes` (at least `N` of them): the whole blocks,
/// then the last `N` bytes if whole blocks leave any out.
fn in_blocks<const N: usize>(bytes: &[u8], found: impl Fn(&[u8; N]) -> bool) -> bool {
    fn as_block<const N: usize>(chunk: &[u8]) -> &[u8; N] {
        chunk.try_into().expect("a whole block")
    }
    let mut blocks = bytes.chunks_exact(N);
    if blocks.any(|chunk| found(as_block(chunk))) {
        return true;
    }
    !blocks.remainder().is_empty() && found(as_block(&bytes[bytes.len() - N..]))
}

/// A `serde_json` serializer (or one of its parts) whose strings are written by
/// [`needs_escape`]'s fast path when they can be.
struct Fast<'a, S> {
    inner: S,
    sink: &'a RefCell<Vec<u8>>,
}

/// A value nested in another: serialised through [`Fast`] too.
struct Nested<'a, T: ?Sized>(&'a T, &'a RefCell<Vec<u8>>);

impl<T: Serialize + ?Sized> Serialize for Nested<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(Fast {
            inner: serializer,
            sink: self.1,
        })
    }
}

/// The compound parts (arrays, maps, structs) of a [`Fast`] serializer; `plain` hands the
/// fields over unwrapped (a `serde_json` private value).
struct Compound<'a, C> {
    inner: C,
    sink: &'a RefCell<Vec<u8>>,
    plain: bool,
}

impl<'a, C> Compound<'a, C> {
    fn new(inner: C, sink: &'a RefCell<Vec<u8>>) -> Self {
        Compound {
            inner,
            sink,
            plain: false,
        }
    }
}

impl<'a, S: Serializer> Serializer for Fast<'a, S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Compound<'a, S::SerializeSeq>;
    type SerializeTuple = Compound<'a, S::SerializeTuple>;
    type SerializeTupleStruct = Compound<'a, S::SerializeTupleStruct>;
    type SerializeTupleVariant = Compound<'a, S::SerializeTupleVariant>;
    type SerializeMap = Compound<'a, S::SerializeMap>;
    type SerializeStruct = Compound<'a, S::SerializeStruct>;
    type SerializeStructVariant = Compound<'a, S::SerializeStructVariant>;

    fn serialize_str(self, v: &str) -> Result<S::Ok, S::Error> {
        if v.len() < FAST_FROM || needs_escape(v.as_bytes()) {
            return self.inner.serialize_str(v);
        }
        let before = self.sink.borrow().len();
        let ok = self.inner.serialize_str("")?;
        let mut out = self.sink.borrow_mut();
        // `serde_json` wrote `""` (after any separator or key, before anything that
        // follows the value): the text goes between the quotes.
        if out.len() != before + 2 || !out.ends_with(b"\"\"") {
            return Err(S::Error::custom(
                "evbus's JSON writer found no empty string where it wrote one",
            ));
        }
        out.pop();
        out.extend_from_slice(v.as_bytes());
        out.push(b'"');
        Ok(ok)
    }

    fn collect_str<T: Display + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.inner.collect_str(value)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }

    fn serialize_bool(self, v: bool) -> Result<S::Ok, S::Error> {
        self.inner.serialize_bool(v)
    }

    fn serialize_i8(self, v: i8) -> Result<S::Ok, S::Error> {
        self.inner.serialize_i8(v)
    }

    fn serialize_i16(self, v: i16) -> Result<S::Ok, S::Error> {
        self.inner.serialize_i16(v)
    }

    fn serialize_i32(self, v: i32) -> Result<S::Ok, S::Error> {
        self.inner.serialize_i32(v)
    }

    fn serialize_i64(self, v: i64) -> Result<S::Ok, S::Error> {
        self.inner.serialize_i64(v)
    }

    fn serialize_i128(self, v: i128) -> Result<S::Ok, S::Error> {
        self.inner.serialize_i128(v)
    }

    fn serialize_u8(self, v: u8) -> Result<S::Ok, S::Error> {
        self.inner.serialize_u8(v)
    }

    fn serialize_u16(self, v: u16) -> Result<S::Ok, S::Error> {
        self.inner.serialize_u16(v)
    }

    fn serialize_u32(self, v: u32) -> Result<S::Ok, S::Error> {
        self.inner.serialize_u32(v)
    }

    fn serialize_u64(self, v: u64) -> Result<S::Ok, S::Error> {
        self.inner.serialize_u64(v)
    }

    fn serialize_u128(self, v: u128) -> Result<S::Ok, S::Error> {
        self.inner.serialize_u128(v)
    }

    fn serialize_f32(self, v: f32) -> Result<S::Ok, S::Error> {
        self.inner.serialize_f32(v)
    }

    fn serialize_f64(self, v: f64) -> Result<S::Ok, S::Error> {
        self.inner.serialize_f64(v)
    }

    fn serialize_char(self, v: char) -> Result<S::Ok, S::Error> {
        self.inner.serialize_char(v)
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<S::Ok, S::Error> {
        self.inner.serialize_bytes(v)
    }

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        self.inner.serialize_none()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.inner.serialize_some(&Nested(value, self.sink))
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.inner.serialize_unit()
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<S::Ok, S::Error> {
        self.inner.serialize_unit_struct(name)
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<S::Ok, S::Error> {
        self.inner.serialize_unit_variant(name, index, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        if name.starts_with(SERDE_JSON_PRIVATE) {
            return self.inner.serialize_newtype_struct(name, value);
        }
        self.inner
            .serialize_newtype_struct(name, &Nested(value, self.sink))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.inner
            .serialize_newtype_variant(name, index, variant, &Nested(value, self.sink))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        let sink = self.sink;
        Ok(Compound::new(self.inner.serialize_seq(len)?, sink))
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        let sink = self.sink;
        Ok(Compound::new(self.inner.serialize_tuple(len)?, sink))
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        let sink = self.sink;
        Ok(Compound::new(
            self.inner.serialize_tuple_struct(name, len)?,
            sink,
        ))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        let sink = self.sink;
        Ok(Compound::new(
            self.inner
                .serialize_tuple_variant(name, index, variant, len)?,
            sink,
        ))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        let sink = self.sink;
        Ok(Compound::new(self.inner.serialize_map(len)?, sink))
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        let sink = self.sink;
        let inner = self.inner.serialize_struct(name, len)?;
        Ok(Compound {
            inner,
            sink,
            plain: name.starts_with(SERDE_JSON_PRIVATE),
        })
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        let sink = self.sink;
        Ok(Compound::new(
            self.inner
                .serialize_struct_variant(name, index, variant, len)?,
            sink,
        ))
    }
}

/// The compound parts whose values come one after another (arrays, tuples): each value is
/// wrapped.
macro_rules! forward_values {
    ($($part:ident::$method:ident),* $(,)?) => {$(
        impl<C: ser::$part> ser::$part for Compound<'_, C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
                self.inner.$method(&Nested(value, self.sink))
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.inner.end()
            }
        }
    )*};
}

forward_values!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl<C: ser::SerializeMap> ser::SerializeMap for Compound<'_, C> {
    type Ok = C::Ok;
    type Error = C::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), C::Error> {
        self.inner.serialize_key(&Nested(key, self.sink))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
        self.inner.serialize_value(&Nested(value, self.sink))
    }

    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        key: &K,
        value: &V,
    ) -> Result<(), C::Error> {
        self.inner
            .serialize_entry(&Nested(key, self.sink), &Nested(value, self.sink))
    }

    fn end(self) -> Result<C::Ok, C::Error> {
        self.inner.end()
    }
}

/// The compound parts whose values come with a field name (structs): each value is wrapped,
/// unless the part is `plain`.
macro_rules! forward_fields {
    ($($part:ident),* $(,)?) => {$(
        impl<C: ser::$part> ser::$part for Compound<'_, C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), C::Error> {
                if self.plain {
                    return self.inner.serialize_field(key, value);
                }
                self.inner.serialize_field(key, &Nested(value, self.sink))
            }

            fn skip_field(&mut self, key: &'static str) -> Result<(), C::Error> {
                self.inner.skip_field(key)
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.inner.end()
            }
        }
    )*};
}

forward_fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;
    use serde_json::json;
    use serde_json::value::RawValue;

    use super::*;

    fn assert_same<T: Serialize + ?Sized>(value: &T) {
        let expected = serde_json::to_vec(value).expect("serde_json writes it");
        let mut out = b"kept:".to_vec();
        write(&mut out, value).expect("evbus writes it");
        assert_eq!(
            String::from_utf8_lossy(&out[5..]),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(&out[..5], b"kept:", "what the buffer held stays in front");
    }

    #[derive(Serialize)]
    enum Shape {
        Unit,
        Newtype(String),
        Tuple(String, u8),
        Struct { name: String, tags: Vec<String> },
    }

    #[derive(Serialize)]
    struct Order<'a> {
        id: &'a str,
        note: Option<String>,
        missing: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u8>,
        lines: Vec<(String, f64)>,
        by_key: BTreeMap<String, String>,
        by_number: BTreeMap<u32, String>,
        shapes: Vec<Shape>,
        letter: char,
        wrapped: Wrapped,
        raw: Box<RawValue>,
        bytes: &'a [u8],
        unit: (),
    }

    #[derive(Serialize)]
    struct Wrapped(String);

    #[test]
    fn strings_are_written_exactly_as_serde_json_writes_them() {
        for text in [
            "",
            "a",
            "plain ascii longer than eight bytes",
            "quote \" inside",
            "back\\slash",
            "control \u{1} and \u{1f} and \t\n\r\u{8}\u{c}",
            "\u{7f} is not escaped",
            "unicode é ü 日本 🎉 stays as it is",
            "ends with a quote\"",
            "\"",
            "\\",
            "1234567\"",
            "12345678\"",
            "123456789\u{0}",
            "</script> and / are not escaped",
        ] {
            // Short strings are serde_json's; long enough ones take the fast path.
            let pad = "y".repeat(FAST_FROM);
            for text in [
                text.to_owned(),
                format!("{pad}{text}"),
                format!("{text}{pad}"),
            ] {
                assert_same(&text);
                assert_same(&[&text, &text]);
                assert_same(&BTreeMap::from([(&text, &text)]));
            }
        }
        // Every byte value below 0x80 in every position of the blocks and of the tail (whole
        // blocks only, and a last block overlapping the one before it), for each block size.
        for len in [FAST_FROM, 31, 32, FAST_FROM + 13, 63, 64, 65, 100, 128, 130] {
            for byte in 0u8..0x80 {
                for at in 0..len {
                    let mut text = "x".repeat(len);
                    text.replace_range(at..=at, &char::from(byte).to_string());
                    assert_same(&text);
                }
            }
        }
    }

    #[test]
    fn every_kind_of_value_is_written_as_serde_json_writes_it() {
        let order = Order {
            id: "o-1",
            note: Some("say \"hi\"".to_owned()),
            missing: None,
            skipped: None,
            lines: vec![("widget".to_owned(), 2.5), ("gadget\n".to_owned(), -1e300)],
            by_key: BTreeMap::from([
                ("plain".to_owned(), "value".to_owned()),
                ("tab\tkey".to_owned(), "tab\tvalue".to_owned()),
            ]),
            by_number: BTreeMap::from([(7, "seven".to_owned()), (42, "forty-two".to_owned())]),
            shapes: vec![
                Shape::Unit,
                Shape::Newtype("n".to_owned()),
                Shape::Tuple("t\"".to_owned(), 3),
                Shape::Struct {
                    name: "s".to_owned(),
                    tags: vec!["a".to_owned(), "b\\".to_owned()],
                },
            ],
            letter: '"',
            wrapped: Wrapped("inner".to_owned()),
            raw: RawValue::from_string(r#"{"kept":  "as written", "n": 1.50}"#.to_owned())
                .expect("valid JSON"),
            bytes: &[0, 1, 255],
            unit: (),
        };
        assert_same(&order);
        assert_same(&json!({
            "s": "text",
            "n": [1, -2, 3.25, null, true, false],
            "nested": {"deep": {"deeper": ["x", {"y": "z\u{0}"}]}},
            "big": u64::MAX,
        }));
        assert_same(&f64::NAN);
        assert_same(&Some("some"));
        assert_same(&(1u8, "two", [3.0f32]));
        assert_same(&i128::MIN);
        assert_same(&u128::MAX);
    }

    #[test]
    fn a_raw_value_alone_or_nested_is_written_untouched() {
        // With and without quotes in it: a raw value's text must not be taken for a string.
        for text in [r#"["a" , "b"]"#, "[1,  2.50]", "true", " 7 "] {
            let raw = RawValue::from_string(text.to_owned()).expect("valid JSON");
            assert_same(&raw);
            assert_same(&vec![&raw, &raw]);
            assert_same(&BTreeMap::from([("raw", &raw)]));
        }
    }

    #[test]
    fn what_serde_json_refuses_is_refused() {
        let key_is_a_pair = BTreeMap::from([((1, 2), 3)]);
        let mut out = Vec::new();
        let refused = write(&mut out, &key_is_a_pair).expect_err("a map key must be a string");
        assert_eq!(
            refused.to_string(),
            serde_json::to_vec(&key_is_a_pair).unwrap_err().to_string()
        );
    }
}
