//! Why payloads live in spool files and not in SQLite blobs: measures, in the same run,
//! taking N packages into the store the way the bridge does (spool file + fsync + directory
//! fsync + journal row in WAL with synchronous = FULL) against the alternative (the payload
//! as a blob in the same journal row, one commit).
//!
//! `cargo run --release --example bench_store -- [N] [SIZE_BYTES]` (defaults 1000, 1024)

use std::time::Instant;

use kkm_bridge::package::Kind;
use kkm_bridge::store::{Store, Taken};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let size: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let dir = tempfile_dir()?;

    // Ours: spool file + journal row.
    let store = Store::open(&dir.join("ours"))?;
    let t0 = Instant::now();
    for i in 0..n {
        let spooled = store.spool_bytes(&payload)?;
        let name = format!("POS1.spr.${}", i + 1);
        store.commit_taken(
            &Taken {
                link: "l",
                pos: 1,
                kind: Kind::Spr,
                uid: None,
                source_endpoint: "office",
                source_name: &name,
                source_seq: Some(i as i64 + 1),
                sink_endpoint: "shop",
            },
            spooled,
        )?;
    }
    let ours = t0.elapsed();

    // The alternative: the payload as a blob in the row (same durability settings).
    let conn = rusqlite::Connection::open(dir.join("blob.sqlite"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE package (id INTEGER PRIMARY KEY, link TEXT, pos INTEGER, name TEXT,
         sha256 TEXT, size INTEGER, payload BLOB, taken_at INTEGER)",
    )?;
    let t0 = Instant::now();
    for i in 0..n {
        conn.execute(
            "INSERT INTO package (link, pos, name, sha256, size, payload, taken_at)
             VALUES ('l', 1, ?1, ?2, ?3, ?4, 0)",
            rusqlite::params![
                format!("POS1.spr.${}", i + 1),
                kkm_bridge::package::sha256_hex(&payload),
                size as i64,
                payload
            ],
        )?;
    }
    let blob = t0.elapsed();
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n as f64;
    println!("store: {n} packages of {size} bytes, durable commits");
    println!(
        "  ours (inline ≤ 64 KiB, else file): {:8.3} ms/package",
        per(ours)
    );
    println!(
        "  blob in the journal row        : {:8.3} ms/package",
        per(blob)
    );
    println!(
        "  ratio ours/blob                : {:8.2}",
        per(ours) / per(blob)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("kkm-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
