//! Benchmark: a file renamed into the office folder → ReceiveData serves it over HTTP.
//!
//! Run through `scripts/bench-pickup` (builds the release binary first). Starts
//! `kkm-bridge run` (the binary given as the first argument) on a temp folder with
//! `settle = "0s"` (the fast path: files renamed into place), then N times: write a
//! package under a temp name, rename it to `POS1.spr.$k`, and poll `GET .../1/k` (1 ms
//! between polls) until it is served; the latency is rename → served reply received.
//! The next request (k+1) acknowledges package k, as a till does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // kassa:bench
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic a2Fzc2E6YmVuY2g=\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn errcode(reply: &str) -> String {
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON reply");
    v["errcode"].as_str().unwrap_or("?").to_string()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let exe = std::fs::canonicalize(
        args.next()
            .expect("usage: bench_pickup PATH/TO/kkm-bridge [N]"),
    )
    .expect("the kkm-bridge binary");
    let n: u32 = args.next().map(|s| s.parse().unwrap()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("bench.toml"),
        format!(
            r#"state_dir = "state"
[endpoint.office]
type = "dir"
path = "office"
settle = "0s"
rescan = "5s"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:{port}"
[[endpoint.tills.user]]
login = "kassa"
password = "bench"
pos = "1"
[[link]]
office = "office"
kassa = "tills"
pos = "1"
"#
        ),
    )
    .unwrap();
    let mut child = Command::new(&exe)
        .args(["run", "--config", "bench.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kkm-bridge");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "kkm-bridge did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let office = dir.path().join("office");
    let payload: Vec<u8> = (0..2048u32)
        .map(|i| b"0123456789;\r\n"[i as usize % 13])
        .collect();
    let mut lat = Vec::with_capacity(n as usize);
    for k in 1..=n {
        let tmp = office.join("~incoming.tmp");
        std::fs::write(&tmp, &payload).unwrap();
        let dest = office.join(format!("POS1.spr.${k}"));
        std::fs::rename(&tmp, &dest).unwrap();
        let t0 = Instant::now();
        loop {
            let r = get(port, &format!("/hs/KKMTransfer/1/{k}"));
            match errcode(&r).as_str() {
                "0" => break,
                "3" => std::thread::sleep(Duration::from_millis(1)),
                other => panic!("package {k}: errcode {other}: {r}"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "package {k} never served"
            );
        }
        lat.push(t0.elapsed());
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = lat.iter().map(|d| ms(*d)).sum::<f64>() / lat.len() as f64;
    println!(
        "kkm-bridge pickup (rename into office → served over HTTP), {} packages of {} bytes, settle=0s:",
        lat.len(),
        payload.len()
    );
    println!(
        "  p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms   mean {:.2} ms",
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.90)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap()),
        mean
    );
    println!("  (poll interval of the client: 1 ms; daemon exit: {status})");
    println!("  peer: not run (no polling peer is installed here); only our numbers are printed");
}
