//! Text from the broker made safe to print: event ids, origins and reasons come from whoever
//! could write to a stream, and a newline in one would forge a line of a listing (or split an
//! id that `dlq redrive` prints one per line), an escape sequence would drive the operator's
//! terminal. Control characters are printed escaped, as Rust writes them (`\n`, `\u{1b}`).

use std::borrow::Cow;

/// `s` with every control character escaped; borrowed when it has none.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A multi-line text (a reason listing violations) on one line: line breaks become `; `, any
/// other control character is escaped.
pub(crate) fn one_line(s: &str) -> String {
    let joined = s
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    printable(&joined.replace(":; ", ": ")).into_owned()
}

/// A writer of log lines that escapes the control characters in them, all but the line's own
/// end: a logged reason quotes property names from a payload, which a producer chooses. Each
/// log line comes in one `write` (the formatter buffers it), ending with its line break.
pub(crate) struct Escaping<W>(pub(crate) W);

impl<W: std::io::Write> std::io::Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let text = String::from_utf8_lossy(body);
        let escaped = printable(&text);
        self.0.write_all(escaped.as_bytes())?;
        self.0.write_all(end)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else_changes() {
        assert!(matches!(printable("order-1 ünï"), Cow::Borrowed(_)));
        assert_eq!(printable("evil\nID  1"), "evil\\nID  1");
        assert_eq!(printable("esc\u{1b}[31mRED"), "esc\\u{1b}[31mRED");
        assert_eq!(
            one_line("invalid (1 violation):\n/n: must be an integer\n"),
            "invalid (1 violation): /n: must be an integer"
        );
        assert_eq!(one_line("a\u{7}b"), "a\\u{7}b");
    }

    #[test]
    fn a_log_line_keeps_its_end_and_nothing_else_breaks_it() {
        use std::io::Write;
        let mut out = Escaping(Vec::new());
        out.write_all(b"WARN reason=/\x1b[31m: bad\nfake line\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "WARN reason=/\\u{1b}[31m: bad\\nfake line\n"
        );
    }
}
