//! Crash points for the tests that prove "nothing lost, nothing doubled".
//!
//! `KKM_BRIDGE_CRASH_AT=<name>` makes the process abort (no unwinding, no flushing: like a
//! SIGKILL or a power cut) the first time it passes the named point. Unset, a crash point
//! costs one cached environment lookup.

use std::sync::OnceLock;

/// The named points, in the order a package passes them.
pub const POINTS: &[&str] = &[
    "after-spool",          // payload fsync'd in the spool, journal row not committed
    "after-taken",          // journal row committed, source not yet removed
    "after-source-removed", // source removed, not yet journaled as done
    "after-delivering",     // sink temp written and journaled, not yet renamed
    "after-rename",         // renamed into place, not yet journaled as delivered
];

/// Points inside crash recovery itself (a crash while recovering from a crash).
pub const RECOVERY_POINTS: &[&str] = &["recovery-between-reset-and-temp-removal"];

/// Points of the HTTP service: a group of SendData reports inserted, not yet committed; the
/// reply of a big package encoded ahead into its temp file, not yet renamed to its name.
pub const HTTP_POINTS: &[&str] = &["report-batch-before-commit", "reply-ahead-before-rename"];

pub fn crash_point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("KKM_BRIDGE_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("kkm-bridge: crash point {name} reached; aborting");
        std::process::abort();
    }
}
