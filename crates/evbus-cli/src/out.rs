//! Everything a command prints on stdout goes through here: [`outln!`] (one line) and
//! [`text`] (a finished block), each written to the locked stdout and flushed, so that a
//! line is known to be out before what depends on it happens (`consume` acks an event only
//! once its line is written).
//!
//! **A reader that goes away.** Rust starts its programs with SIGPIPE ignored, so a write to
//! a pipe whose reader has closed it (`evbus dlq list … | head -1`) fails with `EPIPE`
//! instead of killing the process, and `println!` panics on that (exit status 101 and a panic
//! message). Putting SIGPIPE back to its default would need `unsafe`, which the workspace
//! forbids; it would also kill the process in the middle of whatever it was doing. Here a
//! closed stdout (`ErrorKind::BrokenPipe`) becomes [`Failure::stdout_closed`], returned like
//! any failure: the command stops taking new work, settles what it holds (`consume` gives
//! back, unacknowledged, the event whose line could not be written; `dlq redrive`/`discard`
//! move nothing more; a look gives back what it holds), closes its transport and exits
//! quietly, with no message, with status **141**.
//!
//! **Why 141 and not 0.** 141 is 128 + SIGPIPE (13): what a shell reports for a tool that
//! SIGPIPE killed (`cat`, `grep`, `jq` … in the same place), so `evbus` is seen the way
//! every other command of such a pipeline is. A plain pipeline only looks at the last
//! command's status, so `… | head` is unaffected; a script under `set -o pipefail` sees 141
//! and already has to allow it for the other tools. 0 would claim the command did its whole
//! job, and it did not: `consume --count` did not print (or ack) its events, a redrive
//! stopped partway. 141 is none of the codes the commands give themselves (0, 1, 2).
//!
//! Any other write error (a full disk, an IO error) is an ordinary failure: `evbus: error:
//! cannot write to stdout: …` on stderr and exit status 2.

use std::fmt;
use std::io::{self, Write};

use crate::failure::Failure;

/// Writes one line on stdout (as `println!` would) and flushes it; a failure to write is
/// returned as a [`Failure`] (see the module's documentation).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// `args` and a line break, written to stdout and flushed (what [`outln!`] calls).
pub(crate) fn line(args: fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
        .map_err(failed)
}

/// `text` as it is (its line breaks included), written to stdout and flushed.
pub(crate) fn text(text: &str) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(failed)
}

/// The failure of a write to stdout: closed by its reader (exit 141, quietly), or an error.
fn failed(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::stdout_closed()
    } else {
        Failure::new(format!("cannot write to stdout: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_a_quiet_141_and_any_other_error_a_message() {
        let closed = failed(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(closed.is_stdout_closed());
        let full = failed(io::Error::other("No space left on device"));
        assert!(!full.is_stdout_closed());
        assert_eq!(
            full.to_string(),
            "cannot write to stdout: No space left on device"
        );
    }
}
