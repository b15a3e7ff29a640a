//! `kkm-bridge run`: the daemon end to end, in-process and as the real binary.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const P: &str = "/hs/KKMTransfer";

/// A till's content for package k of till p: distinct, CRLF, CP1251-ish bytes.
fn spr_for(p: u32, k: u32) -> Vec<u8> {
    let mut v = fixture("POS1.spr.cp1251");
    v.extend_from_slice(format!("{p};{k};").as_bytes());
    v.extend_from_slice(b"\xFF\r\n");
    v
}

#[tokio::test]
async fn files_for_three_tills_are_pulled_in_order_and_reports_reach_the_office() {
    let mut b = Bridge::start().await;
    // The back office drops 3 packages for each of tills 1..3 (numbers include $10 after
    // $9 ordering: use 8, 9, 10).
    for p in 1..=3 {
        for (i, k) in [8u32, 9, 10].iter().enumerate() {
            b.drop_office_file(&format!("POS{p}.spr.${k}"), &spr_for(p, i as u32))
                .await;
        }
    }
    // Each till pulls its packages in order, acknowledging by number, concurrently.
    let mut tills = Vec::new();
    for p in 1..=3u32 {
        let addr = b.addr;
        tills.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut n = 100 * p as i64;
            loop {
                let r = request(
                    addr,
                    "GET",
                    &format!("{P}/{p}/{n}"),
                    Some(("kassa", "secret")),
                    b"",
                )
                .await;
                match r.errcode().as_str() {
                    "0" => {
                        // A till may ask twice for the same number: same package.
                        let again = request(
                            addr,
                            "GET",
                            &format!("{P}/{p}/{n}"),
                            Some(("kassa", "secret")),
                            b"",
                        )
                        .await;
                        assert_eq!(again.json(), r.json());
                        got.push(data_bytes(&r));
                        n += 1;
                    }
                    "3" => break,
                    other => panic!("till {p}: errcode {other}: {}", r.errmessage()),
                }
            }
            (p, got)
        }));
    }
    for t in tills {
        let (p, got) = t.await.unwrap();
        let want: Vec<Vec<u8>> = (0..3).map(|i| spr_for(p, i)).collect();
        assert_eq!(
            got, want,
            "till {p} got its packages in order, bytes intact"
        );
    }
    assert!(b.journal().iter().all(|r| r.4 == "delivered"));
    assert_eq!(b.spool_files(), 0);
    // Each till posts two reports; they appear in the office folder with the exact bytes.
    let rep = fixture("POS1.rep.cp1251");
    for p in 1..=3u32 {
        for k in 1..=2u32 {
            let mut bytes = rep.clone();
            bytes.extend_from_slice(format!("{p};{k};\r\n").as_bytes());
            let r = b
                .post(&format!("{P}/SendData/{p}/{k}"), &b64_crlf(&bytes))
                .await;
            assert_eq!(r.errcode(), "0", "{}", r.errmessage());
        }
    }
    wait_until(Duration::from_secs(10), || {
        (1..=3).all(|p| b.office.join(format!("POS{p}.rep.$2")).exists())
    })
    .await;
    for p in 1..=3u32 {
        for k in 1..=2u32 {
            let mut want = rep.clone();
            want.extend_from_slice(format!("{p};{k};\r\n").as_bytes());
            let got = std::fs::read(b.office.join(format!("POS{p}.rep.${k}"))).unwrap();
            assert_eq!(got, want, "till {p} report {k}");
        }
    }
    b.stop().await;
    assert!(b
        .office_files()
        .iter()
        .all(|f| !f.starts_with(".kkm-bridge.")));
}

#[tokio::test]
async fn a_file_written_slowly_is_taken_only_after_it_settles() {
    // settle = 300ms here: a file still being appended to is not served half-written.
    let root = tempfile::tempdir().unwrap();
    let text = config_text(root.path(), "").replace("settle = \"0s\"", "settle = \"300ms\"");
    let config =
        std::sync::Arc::new(kkm_bridge::config::Config::parse(&text, Path::new("t.toml")).unwrap());
    std::fs::create_dir_all(root.path().join("office")).unwrap();
    let store = std::sync::Arc::new(kkm_bridge::store::Store::open(&config.state_dir).unwrap());
    let pump = std::sync::Arc::new(kkm_bridge::pump::Pump::new(config, store.clone()).unwrap());
    let ep = pump.endpoints["tills"].clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let daemon = kkm_bridge::watch::Daemon::new(pump);
    let (stop, shutdown) = kkm_bridge::watch::Shutdown::new();
    let task = tokio::spawn(kkm_bridge::watch::run(
        daemon,
        vec![(ep, listener)],
        shutdown,
    ));
    let path = root.path().join("office/POS1.spr.$1");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..5 {
            writeln!(f, "line {i}").unwrap();
            f.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = request(
                addr,
                "GET",
                &format!("{P}/1/1"),
                Some(("kassa", "secret")),
                b"",
            )
            .await;
            assert_eq!(r.errcode(), "3", "not served while being written");
        }
    }
    let start = Instant::now();
    loop {
        let r = request(
            addr,
            "GET",
            &format!("{P}/1/1"),
            Some(("kassa", "secret")),
            b"",
        )
        .await;
        if r.errcode() == "0" {
            assert_eq!(data_bytes(&r), b"line 0\nline 1\nline 2\nline 3\nline 4\n");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "taken after settling"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    task.await.unwrap();
}

fn binary_config(port: u16) -> String {
    format!(
        r#"
state_dir = "var/state"
[endpoint.office]
type = "dir"
path = "var/office"
settle = "0s"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:{port}"
[[endpoint.tills.user]]
login = "kassa"
password_env = "KKM_TEST_TILLS_PASSWORD"
pos = "1-20"
[[link]]
office = "office"
kassa = "tills"
pos = "1-20"
"#
    )
}

#[tokio::test]
async fn the_binary_serves_tills_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("store.toml"), binary_config(port)).unwrap();
    let exe = env!("CARGO_BIN_EXE_kkm-bridge");
    let mut child = Command::new(exe)
        .args(["run", "--config", "store.toml"])
        .current_dir(dir.path())
        .env("KKM_TEST_TILLS_PASSWORD", "s3cret")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = wait_listening(port, Duration::from_secs(10)).await;
    // `run` created the office folder of a fresh install.
    let office = dir.path().join("var/office");
    assert!(office.is_dir());
    // sync must not process the same store while run holds it.
    let sync = Command::new(exe)
        .args(["sync", "--config", "store.toml"])
        .current_dir(dir.path())
        .env("KKM_TEST_TILLS_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert_eq!(
        sync.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );

    let spr = fixture("POS1.spr.utf8bom");
    drop_by_rename(&office, "POS1.spr.$1", &spr);
    let start = Instant::now();
    loop {
        let r = request(
            addr,
            "GET",
            &format!("{P}/1/1"),
            Some(("kassa", "s3cret")),
            b"",
        )
        .await;
        if r.errcode() == "0" {
            assert_eq!(data_bytes(&r), spr);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The till loaded it and asks for the next number: acknowledged, nothing more queued.
    let r = request(
        addr,
        "GET",
        &format!("{P}/1/2"),
        Some(("kassa", "s3cret")),
        b"",
    )
    .await;
    assert_eq!(r.errcode(), "3");
    let rep = fixture("POS1.rep.utf8bom");
    let r = request(
        addr,
        "POST",
        &format!("{P}/SendData/1/1"),
        Some(("kassa", "s3cret")),
        &b64_crlf(&rep),
    )
    .await;
    assert_eq!(r.errcode(), "0");
    wait_until(Duration::from_secs(10), || {
        office.join("POS1.rep.$1").exists()
    })
    .await;
    assert_eq!(std::fs::read(office.join("POS1.rep.$1")).unwrap(), rep);

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(
        &mut child,
        Duration::from_secs(10),
        "stops within 10 s of SIGTERM",
    )
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(!stderr.contains("s3cret"), "the password is never logged");
    // Nothing half-written remains: no temp files; everything delivered left the spool.
    for e in std::fs::read_dir(&office).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".kkm-bridge."), "temp file left: {name}");
    }
    assert_eq!(walk_files(&dir.path().join("var/state/spool")), 0);
    // And the store opens again (the lock was released).
    kkm_bridge::store::Store::open(&dir.path().join("var/state")).unwrap();
}

#[tokio::test]
async fn a_port_in_use_does_not_stop_the_directory_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    // A second link from the office folder to a kassa folder keeps working.
    let cfg = binary_config(port)
        + r#"
[endpoint.shop]
type = "dir"
path = "var/shop"
settle = "0s"
[[link]]
name = "to-shop"
office = "office"
kassa = "shop"
pos = "21-30"
"#;
    std::fs::write(dir.path().join("store.toml"), cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kkm-bridge"))
        .args(["run", "--config", "store.toml"])
        .current_dir(dir.path())
        .env("KKM_TEST_TILLS_PASSWORD", "x")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let office = dir.path().join("var/office");
    let start = Instant::now();
    while !office.is_dir() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(office.join("~t"), b"x").unwrap();
    std::fs::rename(office.join("~t"), office.join("POS21.spr.$1")).unwrap();
    let shop = dir.path().join("var/shop/POS21.spr.$1");
    let start = Instant::now();
    while !shop.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon must keep running"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "delivered to the shop folder"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    drop(busy);
}

#[tokio::test]
async fn single_file_tills_get_the_next_file_as_soon_as_they_consume_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = r#"
state_dir = "var/state"
[endpoint.office]
type = "dir"
path = "var/office"
settle = "0s"
rescan = "30s"
[endpoint.shop]
type = "dir"
path = "var/shop"
numbered = false
settle = "0s"
rescan = "30s"
[[link]]
office = "office"
kassa = "shop"
pos = "1-5"
"#;
    std::fs::write(dir.path().join("k.toml"), cfg).unwrap();
    let office = dir.path().join("var/office");
    let shop = dir.path().join("var/shop");
    std::fs::create_dir_all(&office).unwrap();
    for k in 1..=3u32 {
        std::fs::write(office.join(format!("POS2.spr.${k}")), spr_for(2, k)).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_kkm-bridge"))
        .args(["run", "--config", "k.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = shop.join("POS2.spr");
    for k in 1..=3u32 {
        // The till finds its one file, loads it and deletes it; the next one must follow
        // at once (filesystem events), not after the 5 s retry or the 30 s rescan.
        let start = Instant::now();
        while std::fs::read(&file).ok() != Some(spr_for(2, k)) {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "package {k} written within 3 s of the previous one being consumed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_file(&file).unwrap();
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}
