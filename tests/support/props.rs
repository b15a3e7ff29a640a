//! What the property tests (tests/proptest.rs, tests/stream_codec.rs) share: their config,
//! the vendor fixtures as seeds, and the mutation of a seed. Included with `#[path]`.

use std::path::Path;

use proptest::prelude::*;

/// `PROPTEST_CASES` cases per property (`default_cases` when unset); no failure files.
pub fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every vendor fixture's bytes, sorted (there must be some).
pub fn fixtures() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    assert!(!v.is_empty(), "fixtures in {}", dir.display());
    v
}

/// A byte string mutated at a few places (flip, insert, delete, truncate).
pub fn mutate(mut b: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, op, byte) in edits {
        if b.is_empty() {
            b.push(byte);
            continue;
        }
        let i = at % b.len();
        match op % 4 {
            0 => b[i] ^= byte | 1,
            1 => b.insert(i, byte),
            2 => {
                b.remove(i);
            }
            _ => b.truncate(i),
        }
    }
    b
}
