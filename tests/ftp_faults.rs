//! FTP faults beyond tests/ftp.rs, on libunftp with a fault-injecting storage back-end:
//! a listing slower than `timeout`, a full disk on the server (STOR answers 452 or 552),
//! and the data connection dropped during an upload. Each test shows the endpoint
//! recovers by itself, leaves no temp file and loses and doubles nothing.
//! (The servers, faults and bridge helpers are tests/support/ftp_server.rs, shared with
//! tests/ftp.rs.)
#![allow(dead_code)]

use std::time::Duration;

#[path = "support/ftp_server.rs"]
mod ftp_server;
use ftp_server::*;

// ------------------------------------------------------------------ faults

/// Every name on the server that is a temp name of the bridge.
async fn temps(server: &Server) -> Vec<String> {
    server
        .names()
        .await
        .into_iter()
        .filter(|n| kkm_bridge::package::is_temp_name(n))
        .collect()
}

/// A listing slower than `timeout`: the pass fails (logged), the endpoint reconnects on the
/// next pass, and the package is taken once, whole.
#[tokio::test]
async fn a_listing_slower_than_timeout_times_out_reconnects_and_loses_nothing() {
    let (_root, faults, server) = Server::unftp_faulty();
    let shop = tempfile::tempdir().unwrap();
    let spr = fixture("POS1.spr.cp1251");
    server.put("POS3.spr.$1", &spr).await;
    let b = bridge(&format!(
        "{}{}{}",
        ftp_endpoint("office", &server.url, "").replace("timeout = \"5s\"", "timeout = \"1s\""),
        dir_endpoint("shop", shop.path(), ""),
        link("office", "shop", "3")
    ));
    // First sight (and the start-up temp cleanup, which lists too).
    assert_eq!(b.pass().await.taken, 0);
    faults
        .slow_list_ms
        .store(3000, std::sync::atomic::Ordering::SeqCst);
    faults
        .slow_lists
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    let r = b.pass().await;
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "bounded by timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(r.taken, 0, "{r:?}");
    assert!(!r.errors.is_empty(), "the timeout is reported: {r:?}");
    let r = b.settle(20).await;
    assert_eq!((r.taken, r.delivered), (1, 1), "{r:?}");
    assert!(r.all_moved(), "{r:?}");
    assert_eq!(dir_names(shop.path()), ["POS3.spr.$1"]);
    assert_eq!(std::fs::read(shop.path().join("POS3.spr.$1")).unwrap(), spr);
    assert!(server.names().await.is_empty());
}

/// The server's disk is full: STOR answers 452, then 552. The package stays queued, no
/// temp file is left, and once space returns it is written once.
#[tokio::test]
async fn a_full_disk_on_the_server_keeps_the_package_queued_and_leaves_no_temp() {
    let (_root, faults, server) = Server::unftp_faulty();
    let office = tempfile::tempdir().unwrap();
    let b = dir_to_ftp(office.path(), &server.url, "", "4");
    let spr = fixture("POS1.spr.utf8bom");
    std::fs::write(office.path().join("POS4.spr.$1"), &spr).unwrap();
    faults
        .full_452
        .store(1, std::sync::atomic::Ordering::SeqCst);
    faults
        .full_552
        .store(1, std::sync::atomic::Ordering::SeqCst);
    for code in ["452", "552"] {
        let r = b.pass().await;
        assert_eq!((r.delivered, r.queued), (0, 1), "{code}: {r:?}");
        assert!(temps(&server).await.is_empty(), "{code}: no temp left");
        assert!(server.names().await.is_empty(), "{code}");
    }
    assert_eq!(
        b.pump.store.counts(None).unwrap().queued,
        1,
        "still queued, not lost"
    );
    let r = b.settle(10).await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(server.names().await, ["POS4.spr.$1"]);
    assert_eq!(server.get("POS4.spr.$1").await, spr);
}

/// The data connection drops during an upload: the half-written temp file never becomes a
/// package name, it is cleaned up, and the package is written again, whole, once.
#[tokio::test]
async fn an_upload_dropped_mid_transfer_is_written_again_whole() {
    let (_root, faults, server) = Server::unftp_faulty();
    let office = tempfile::tempdir().unwrap();
    let b = dir_to_ftp(office.path(), &server.url, "", "5");
    let mut spr = fixture("POS1.spr.cp1251");
    while spr.len() < 4096 {
        spr.extend_from_slice(b"1;2;3;\r\n");
    }
    std::fs::write(office.path().join("POS5.spr.$1"), &spr).unwrap();
    faults
        .cut_uploads
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let r = b.pass().await;
    assert_eq!((r.delivered, r.queued), (0, 1), "{r:?}");
    assert!(
        !server.names().await.iter().any(|n| n.starts_with("POS5")),
        "a partial upload never appears under a package name: {:?}",
        server.names().await
    );
    let r = b.settle(10).await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(server.names().await, ["POS5.spr.$1"], "no temp left");
    assert_eq!(server.get("POS5.spr.$1").await, spr);
}

// ------------------------------------------------------------------ crashes

/// A real process (`kkm-bridge sync`, office folder → FTP) aborted at every commit point,
/// then run again twice: every till ends with its packages exactly once, in order, and no
/// temp file is left. `after-delivering` and `after-rename` fall in the middle of a batch:
/// the batch's "delivering" commit is done and, for `after-rename`, the first of its
/// renames. Twice: two sessions with one batch each (3 tills × 4), and one session with
/// two pipelined batches (3 tills × 15: 32 + 13), where the second batch is already
/// uploaded, not journaled, when the first one's crash point is reached. And with a big
/// first package per till (33 MiB), uploaded ahead while it is taken: `after-spool` falls
/// while its upload runs or after it ended, before the commit.
#[tokio::test]
async fn a_crash_at_any_commit_point_of_an_ftp_delivery_loses_and_doubles_nothing() {
    for (tills, per, conns, big) in [
        (3u32, 4u32, 2u32, false),
        (3, 15, 1, false),
        (2, 3, 2, true),
    ] {
        crash_at_every_point(tills, per, conns, big).await;
    }
}

async fn crash_at_every_point(tills: u32, per: u32, conns: u32, big: bool) {
    let spr = |pos: u32, n: u32| {
        let mut b = format!("##@@&&$$$ADD\r\n#\r\ntill {pos} package {n}\r\n").into_bytes();
        if big && n == 1 {
            b.extend(noise(u64::from(pos), 33 << 20));
        }
        b
    };
    for point in kkm_bridge::failpoint::POINTS {
        let root = tempfile::tempdir().unwrap();
        let server = Server::unftp(root.path());
        let site = tempfile::tempdir().unwrap();
        let office = site.path().join("office");
        std::fs::create_dir_all(&office).unwrap();
        for pos in 1..=tills {
            for n in 1..=per {
                std::fs::write(office.join(format!("POS{pos}.spr.${n}")), spr(pos, n)).unwrap();
            }
        }
        let config = site.path().join("kkm-bridge.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\n{}{}{}",
                site.path().join("state"),
                dir_endpoint("office", &office, ""),
                ftp_endpoint("shopftp", &server.url, &format!("connections = {conns}")),
                link("office", "shopftp", "1-3")
            ),
        )
        .unwrap();
        let sync = |crash: Option<&str>| {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kkm-bridge"));
            c.args(["sync", "--config"]).arg(&config);
            if let Some(p) = crash {
                c.env("KKM_BRIDGE_CRASH_AT", p);
            }
            c.env("RUST_LOG", "warn").output().unwrap()
        };
        let o = sync(Some(point));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&format!("crash point {point} reached")),
            "{point}: the crash point must be reached: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), None, "{point}: aborted, not exited");
        sync(None);
        let o = sync(None);
        assert!(
            o.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut want: Vec<String> = (1..=tills)
            .flat_map(|p| (1..=per).map(move |n| format!("POS{p}.spr.${n}")))
            .collect();
        want.sort();
        assert_eq!(server.names().await, want, "{point}");
        let got = server.get_many(&want).await;
        for (name, bytes) in want.iter().zip(got) {
            let (p, n) = name
                .strip_prefix("POS")
                .and_then(|r| r.split_once(".spr.$"))
                .unwrap();
            assert!(
                bytes == spr(p.parse().unwrap(), n.parse().unwrap()),
                "{point}: {name}: other bytes"
            );
        }
        assert!(dir_names(&office).is_empty(), "{point}");
    }
}
