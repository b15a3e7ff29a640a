//! Small helpers every kind of test file uses, whatever harness it has (tests/common, the
//! FTP servers of tests/support, or none): the vendor fixtures, deterministic bytes, a free
//! port. Included with `#[path]`; each includer uses only some of it.
#![allow(dead_code)]

use std::path::Path;

/// A vendor fixture from `../shared/fixtures`, by file name.
pub fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Deterministic bytes of every value (xorshift), `n` of them.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A port nobody listens on right now (for a server that binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
