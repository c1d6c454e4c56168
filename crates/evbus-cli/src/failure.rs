//! How a command fails, and the exit codes every command shares.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (for `check`: the payload is valid) |
//! | 1 | the input was examined and refused (for `check`: the payload is invalid) |
//! | 2 | the command could not do its job: usage, IO or schema errors |
//! | 141 | stdout was closed by its reader (`… \| head`): see [`crate::out`] |

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

/// Exit code: the input was examined and refused.
pub(crate) const INVALID: u8 = 1;
/// Exit code: usage, IO or schema error.
pub(crate) const ERROR: u8 = 2;
/// Exit code: stdout was closed by its reader; 128 + SIGPIPE, what a shell reports for a tool
/// that SIGPIPE killed (why not 0: see [`crate::out`]).
pub(crate) const STDOUT_CLOSED: u8 = 141;

/// The most problems a command prints for one run: a payload of millions of violations must
/// not become millions of lines. The count of the rest is said on stderr.
pub(crate) const MAX_PROBLEMS: usize = 100;

/// `problems` bounded by [`MAX_PROBLEMS`], one per line, and the line that says how many were
/// left out (`None` when none were).
pub(crate) fn bounded<T: fmt::Display>(problems: &[T]) -> (String, Option<String>) {
    let mut text = String::new();
    for p in problems.iter().take(MAX_PROBLEMS) {
        text.push_str(&format!("{p}\n"));
    }
    let rest = problems.len().saturating_sub(MAX_PROBLEMS);
    let note = (rest > 0).then(|| {
        format!(
            "evbus: {} problems in all; the first {MAX_PROBLEMS} are shown, {rest} more are not",
            problems.len()
        )
    });
    (text, note)
}

/// A command that could not do its job (exit code 2), with a message for stderr; or whose
/// stdout was closed by its reader (exit code 141, no message).
#[derive(Debug)]
pub(crate) struct Failure {
    message: String,
    stdout_closed: bool,
}

impl Failure {
    pub(crate) fn new(message: impl fmt::Display) -> Self {
        Failure {
            message: message.to_string(),
            stdout_closed: false,
        }
    }

    /// Stdout was closed by its reader (`evbus dlq list … | head -1`): the command stops,
    /// quietly, with exit code [`STDOUT_CLOSED`] (see [`crate::out`]).
    pub(crate) fn stdout_closed() -> Self {
        Failure {
            message: "stdout was closed by its reader".to_owned(),
            stdout_closed: true,
        }
    }

    /// Whether this is [`Failure::stdout_closed`].
    #[cfg(test)]
    pub(crate) fn is_stdout_closed(&self) -> bool {
        self.stdout_closed
    }

    /// This failure with `more` added to its message (after a semicolon); a closed stdout
    /// says nothing, so it stays as it is.
    pub(crate) fn adding(mut self, more: impl fmt::Display) -> Self {
        if !self.stdout_closed {
            self.message = format!("{}; {more}", self.message);
        }
        self
    }

    /// Prints the message on stderr and returns exit code 2; for a closed stdout, prints
    /// nothing and returns exit code 141. A stderr that cannot be written (the same closed
    /// pipe, `2>&1 | head`) is not a panic either.
    pub(crate) fn report(self) -> ExitCode {
        if self.stdout_closed {
            return ExitCode::from(STDOUT_CLOSED);
        }
        let _ = writeln!(std::io::stderr(), "evbus: error: {}", self.message);
        ExitCode::from(ERROR)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<evbus::SchemaError> for Failure {
    fn from(e: evbus::SchemaError) -> Self {
        Failure::new(e)
    }
}
