//! SendData under load with the daemon killed: group commit loses and doubles nothing.
//!
//! Tills push reports concurrently (so that reports share transactions) while the real
//! binary is SIGKILLed and restarted, and once aborted at the crash point between a
//! batch's inserts and its commit. A till that gets no answer, or errcode "2", sends the
//! same report again under the same number, as Kassir does. In the end the office folder
//! must hold every report exactly once, in each till's order.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TILLS: u32 = 16;
const REPORTS: u32 = 80;

fn config(port: u16) -> String {
    format!(
        r#"
state_dir = "state"
[endpoint.office]
type = "dir"
path = "office"
settle = "0s"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:{port}"
auth = "none"
[[link]]
office = "office"
kassa = "tills"
pos = "1-{TILLS}"
"#
    )
}

fn report(pos: u32, n: u32) -> Vec<u8> {
    format!(
        "\u{feff}#report till {pos} number {n}\r\n{}\r\n",
        "x".repeat(700)
    )
    .into_bytes()
}

fn start(dir: &Path, crash_at: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kkm-bridge"));
    cmd.args(["run", "--config", "bridge.toml"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(point) = crash_at {
        cmd.env("KKM_BRIDGE_CRASH_AT", point);
    }
    cmd.spawn().unwrap()
}

/// One SendData; `None` when the connection failed (the daemon is down or was killed).
async fn send(addr: SocketAddr, pos: u32, n: u32, body: &[u8]) -> Option<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST /hs/KKMTransfer/SendData/{pos}/{n} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let json = text.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(v["errcode"].as_str()?.to_string())
}

/// A till: reports 1..=REPORTS in order, each repeated until it gets "0" or "1".
/// Returns how many answers were "1" (a report stored before the till heard so).
async fn till(addr: SocketAddr, pos: u32, accepted: Arc<AtomicU32>) -> u32 {
    use base64::Engine as _;
    let mut repeats = 0;
    for n in 1..=REPORTS {
        let body = base64::engine::general_purpose::STANDARD.encode(report(pos, n));
        let start = Instant::now();
        loop {
            match send(addr, pos, n, body.as_bytes()).await.as_deref() {
                Some("0") => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Some("1") => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    repeats += 1;
                    break;
                }
                _ => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "till {pos}: report {n} never accepted"
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    repeats
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_pushed_while_the_daemon_is_killed_arrive_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("bridge.toml"), config(port)).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // First life: aborts inside the first batch it commits (after the inserts, before the
    // commit): nothing of that batch may survive, and the tills must be told nothing.
    let mut child = start(dir.path(), Some("report-batch-before-commit"));
    let accepted = Arc::new(AtomicU32::new(0));
    let tills: Vec<_> = (1..=TILLS)
        .map(|p| tokio::spawn(till(addr, p, accepted.clone())))
        .collect();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the crash point is reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Then lives SIGKILLed at random moments while the tills keep pushing: one kill per
    // ~1/10 of the reports accepted, so that the kills land mid-load however fast the
    // machine is.
    let total = TILLS * REPORTS;
    let mut kills = 0;
    let mut next = 0;
    loop {
        child = start(dir.path(), None);
        if kills == 8 {
            break;
        }
        next += total / 12 + rand::random::<u32>() % (total / 24);
        let t0 = Instant::now();
        while accepted.load(Ordering::SeqCst) < next {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the tills make progress"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kill9(&mut child);
        kills += 1;
    }
    let mut repeats = 0;
    for t in tills {
        repeats += t.await.unwrap();
    }

    // Every report reaches the office once, in order, whatever the kills did.
    let office = dir.path().join("office");
    let expected = (TILLS * REPORTS) as usize;
    let t0 = Instant::now();
    let files = loop {
        let files: Vec<_> = std::fs::read_dir(&office)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".rep."))
            .collect();
        if files.len() >= expected || t0.elapsed() > Duration::from_secs(30) {
            break files;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    kill9(&mut child);
    let mut per_till: BTreeMap<u32, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
    for name in &files {
        let (pos, n) = name
            .strip_prefix("POS")
            .and_then(|r| r.split_once(".rep.$"))
            .unwrap_or_else(|| panic!("unexpected file {name}"));
        per_till.entry(pos.parse().unwrap()).or_default().insert(
            n.parse().unwrap(),
            std::fs::read(office.join(name)).unwrap(),
        );
    }
    assert_eq!(
        files.len(),
        expected,
        "every report once ({kills} kills, {repeats} answered \"1\"): {per_till:?}"
    );
    for pos in 1..=TILLS {
        let got = &per_till[&pos];
        for (k, (_, bytes)) in got.iter().enumerate() {
            assert_eq!(
                bytes,
                &report(pos, k as u32 + 1),
                "till {pos}: file {} holds report {}",
                k + 1,
                k + 1
            );
        }
    }
    eprintln!("{kills} kills, {repeats} reports answered \"1\" after a lost reply");
}
