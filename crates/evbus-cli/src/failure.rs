//! How a command fails, and the exit codes every command shares.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (for `check`: the payload is valid) |
//! | 1 | the input was examined and refused (for `check`: the payload is invalid) |
//! | 2 | the command could not do its job: usage, IO or schema errors |

use std::fmt;
use std::process::ExitCode;

/// Exit code: the input was examined and refused.
pub(crate) const INVALID: u8 = 1;
/// Exit code: usage, IO or schema error.
pub(crate) const ERROR: u8 = 2;

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

/// A command that could not do its job (exit code 2), with a message for stderr.
#[derive(Debug)]
pub(crate) struct Failure {
    message: String,
}

impl Failure {
    pub(crate) fn new(message: impl fmt::Display) -> Self {
        Failure {
            message: message.to_string(),
        }
    }

    /// Prints the message on stderr and returns exit code 2.
    pub(crate) fn report(self) -> ExitCode {
        eprintln!("evbus: error: {}", self.message);
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
