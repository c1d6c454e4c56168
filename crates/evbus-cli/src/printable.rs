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
}
