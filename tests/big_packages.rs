//! Big packages through KKMTransfer (README "Guarantees": stream big files, never hold more
//! than a few packages in memory): a package over `INLINE_MAX` is served from a reply
//! encoded once into a file and streamed; a big report is decoded as its body arrives.
//! Bytes stay exact, the vendor's reply shape stays, memory stays bounded.
//!
//! The memory test runs the real binary and reads its peak RSS (VmHWM). It moves
//! `KKM_BIG_MIB` MiB each way (default 32, which the old whole-body code could not move
//! under 64 MiB); `KKM_BIG_MIB=256 cargo test --release --test big_packages` for the
//! full-size run.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kkm_bridge::package::{encode_plain_base64, encode_zip_base64, sha256_hex, zip_one};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const P: &str = "/hs/KKMTransfer";

/// Deterministic bytes (xorshift), `n` of them: half binary noise (every byte value, which
/// deflate cannot shrink), half price-list text (which it can).
fn big_payload(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 64);
    v.extend_from_slice(b"##@@&&\r\n#\r\n");
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (x >> 60) < 8 {
            v.extend_from_slice(&x.to_le_bytes());
        } else {
            v.extend_from_slice(
                format!("{};товар {};{}.00;\r\n", x % 100_000, x % 977, x % 500).as_bytes(),
            );
        }
    }
    v.truncate(n);
    v
}

/// The `data` of a reply, as a till decodes it.
fn till_decodes(r: &Reply) -> Vec<u8> {
    data_bytes(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_package_is_served_from_a_file_in_the_vendor_shape_with_exact_bytes() {
    let b = Bridge::start().await;
    let spr = big_payload(1, 8 << 20);
    b.drop_office_file("POS1.spr.$1", &spr).await;
    let r = b.get(&format!("{P}/1/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    // The attributes in the order the small path writes them, CRLF-wrapped base64 of a ZIP
    // with one deflated entry.
    assert!(r.body.starts_with(br#"{"data":""#));
    assert!(r
        .body
        .ends_with(br#"","errcode":"0","errmessage":"","packagetype":"spr"}"#));
    let j = r.json();
    let data = j["data"].as_str().unwrap();
    let lines: Vec<&str> = data.split("\r\n").collect();
    assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == 64));
    assert!(lines.last().unwrap().len() <= 64);
    let zip = kkm_bridge::package::decode_base64(data.as_bytes()).unwrap();
    let mut a = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(
        a.by_index(0).unwrap().compression(),
        zip::CompressionMethod::Deflated
    );
    assert!(till_decodes(&r) == spr, "bytes are sacred");
    assert_eq!(b.scratch_files(), 1, "the encoded reply is kept");
    // Asked again: the same bytes, from the same file.
    let again = b.get(&format!("{P}/1/1")).await;
    assert!(again.body == r.body);
    assert_eq!(b.journal()[0].4, "taken");
    // The next number acknowledges it: the payload and its encoded reply are freed.
    let next = b.get(&format!("{P}/1/2")).await;
    assert_eq!(next.errcode(), "3");
    assert_eq!(b.journal()[0].4, "delivered");
    assert_eq!(b.scratch_files(), 0, "the reply file goes with the package");
    assert_eq!(b.spool_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_flr_carries_its_uid_and_concurrent_requests_share_one_encoding() {
    let b = Bridge::start().await;
    let flr = big_payload(2, 3 << 20);
    b.drop_office_file("POS4.flr.$1", &flr).await;
    let mut tills = Vec::new();
    for _ in 0..4 {
        let addr = b.addr;
        tills.push(tokio::spawn(async move {
            request(
                addr,
                "GET",
                &format!("{P}/4/7"),
                Some(("kassa", "secret")),
                b"",
            )
            .await
        }));
    }
    let mut bodies = Vec::new();
    for t in tills {
        bodies.push(t.await.unwrap());
    }
    let first = &bodies[0];
    assert!(
        bodies.iter().all(|r| r.body == first.body),
        "one reply for all"
    );
    let j = first.json();
    assert_eq!(j["packagetype"], "flr");
    let uid = j["UID"].as_str().expect("flr carries a UID");
    assert!(first.body.ends_with(
        format!(r#"","errcode":"0","errmessage":"","packagetype":"flr","UID":"{uid}"}}"#)
            .as_bytes()
    ));
    assert!(till_decodes(first) == flr);
    assert_eq!(b.scratch_files(), 1, "encoded once, no temp file left");
}

/// POSTs `body` chunked (no Content-Length) to SendData/`at`; the server may answer and
/// close before it has read it all.
async fn post_chunked(b: &Bridge, at: &str, body: &[u8]) -> Reply {
    let mut raw = format!(
        "POST {P}/SendData/{at} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        basic("kassa", "secret")
    )
    .into_bytes();
    for piece in body.chunks(100_000) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let _ = s.write_all(&raw).await;
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply).await;
    parse_reply(&reply)
}

async fn sends(b: &Bridge, pos: u32, number: u32, body: &[u8]) -> Reply {
    b.post(&format!("{P}/SendData/{pos}/{number}"), body).await
}

async fn office_gets(b: &Bridge, name: &str, want: &[u8]) {
    let path = b.office.join(name);
    wait_until(Duration::from_secs(30), || path.exists()).await;
    let got = std::fs::read(&path).unwrap();
    assert!(got == want, "{name}: bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_reports_in_every_shape_are_stored_exactly_and_a_repeat_leaves_nothing() {
    let b = Bridge::start_with_max_body("64MiB").await;
    let reps: Vec<Vec<u8>> = (0..4)
        .map(|i| big_payload(10 + i, (8 << 20) + i as usize))
        .collect();
    let plain = encode_plain_base64(&reps[0]).into_bytes();
    let zipped_wrapped = encode_zip_base64(&reps[1], "v8_1.txt").into_bytes();
    let json = serde_json::to_vec(&encode_zip_base64(&reps[2], "v8_2.txt")).unwrap();
    for (n, body) in [(1, &plain), (2, &zipped_wrapped), (3, &json)] {
        let r = sends(&b, 1, n, body).await;
        assert_eq!(r.errcode(), "0", "report {n}: {}", r.errmessage());
    }
    // Chunked, with no Content-Length.
    let r = post_chunked(&b, "1/4", &b64_crlf(&reps[3])).await;
    assert_eq!(r.errcode(), "0", "chunked: {}", r.errmessage());
    for (i, rep) in reps.iter().enumerate() {
        office_gets(&b, &format!("POS1.rep.${}", i + 1), rep).await;
    }
    // The same report again, differently wrapped: "1", and its spooled copy is dropped.
    let r = sends(&b, 1, 1, &b64_crlf(&reps[0])).await;
    assert_eq!(r.errcode(), "1", "{}", r.errmessage());
    assert_eq!(b.journal().len(), 4);
    wait_until(Duration::from_secs(10), || {
        b.journal().iter().all(|r| r.4 == "delivered")
    })
    .await;
    assert_eq!(b.spool_files(), 0, "no orphan spool file");
    assert_eq!(b.scratch_files(), 0, "no scratch file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_bad_reports_are_refused_as_before_and_leave_no_file() {
    let b = Bridge::start_with_max_body("16MiB").await;
    let rep = big_payload(20, 4 << 20);
    // Bad base64 at the very end of a big body.
    let mut bad = b64_crlf(&rep);
    bad.extend_from_slice(b"!!");
    let r = sends(&b, 1, 7, &bad).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage()
            .starts_with("ККМ 1, пакет 7: данные не в формате base64"),
        "{}",
        r.errmessage()
    );
    // A JSON string body that never ends.
    let mut open = serde_json::to_vec(&encode_plain_base64(&rep)).unwrap();
    open.pop();
    let r = sends(&b, 1, 8, &open).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage().contains("неверная строка JSON"),
        "{}",
        r.errmessage()
    );
    // A ZIP that unpacks past max_body, big enough to be unpacked from a scratch file.
    let mut bomb_content = big_payload(21, 2 << 20);
    bomb_content.resize(40 << 20, b'0');
    let bomb = encode_zip_base64(&bomb_content, "bomb.txt").into_bytes();
    assert!(bomb.len() > 1 << 20 && bomb.len() < 16 << 20);
    let r = sends(&b, 1, 9, &bomb).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage()
            .starts_with("ККМ 1, пакет 9: неверный ZIP-архив"),
        "{}",
        r.errmessage()
    );
    // A ZIP in the ZIP, and an empty one.
    let nested = encode_plain_base64(&zip_one(&zip_one(&rep, "in.txt"), "out.zip")).into_bytes();
    let r = sends(&b, 1, 10, &nested).await;
    assert!(
        r.errmessage().contains("вложенный ZIP-архив"),
        "{}",
        r.errmessage()
    );
    let empty = encode_plain_base64(&zip_one(b"", "e.txt")).into_bytes();
    let r = sends(&b, 1, 11, &empty).await;
    assert!(
        r.errmessage().contains("пустой пакет"),
        "{}",
        r.errmessage()
    );
    // A body past max_body while streaming (declared sizes are refused before reading).
    let huge = b64_crlf(&big_payload(22, 13 << 20));
    assert!(huge.len() as u64 > 16 << 20);
    let r = post_chunked(&b, "1/12", &huge).await;
    assert!(r.errmessage().contains("max_body"), "{}", r.errmessage());
    assert!(b.journal().is_empty(), "nothing stored");
    assert_eq!(b.spool_files(), 0, "nothing partial kept");
    assert_eq!(b.scratch_files(), 0, "no scratch file left");
}

// ---------------------------------------------------------------------------------------
// The real binary: peak memory while moving big packages both ways.
// ---------------------------------------------------------------------------------------

/// Peak resident memory of process `pid`, from /proc.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb << 10
}

/// Sends `head` then the file `body` (streamed from disk), reads the whole reply, however
/// long it takes (a debug build encodes slowly).
async fn long_request(addr: std::net::SocketAddr, head: &[u8], body: Option<&Path>) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    if let Some(body) = body {
        let mut f = tokio::fs::File::open(body).await.unwrap();
        tokio::io::copy(&mut f, &mut s).await.unwrap();
    }
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    parse_reply(&reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_moves_big_packages_both_ways_in_bounded_memory() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("note: no /proc; skipped");
        return;
    }
    let mib: usize = std::env::var("KKM_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let office = d.path().join("office");
    std::fs::create_dir_all(&office).unwrap();
    std::fs::write(
        d.path().join("b.toml"),
        daemon_config(
            Path::new("state"),
            port,
            "max_body = \"4GiB\"\nbody_timeout = \"600s\"\n",
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kkm-bridge"))
        .args(["run", "--config", "b.toml"])
        .current_dir(d.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let addr = wait_listening(port, Duration::from_secs(20)).await;
    let idle = vm_hwm(child.id());

    // Office → till: a big price list.
    let spr = big_payload(30, mib << 20);
    let spr_sha = sha256_hex(&spr);
    drop_by_rename(&office, "POS1.spr.$1", &spr);
    drop(spr);
    let t0 = Instant::now();
    while office.join("POS1.spr.$1").exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let r = long_request(
        addr,
        format!("GET {P}/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        None,
    )
    .await;
    let get_took = t0.elapsed();
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    assert_eq!(sha256_hex(&data_bytes(&r)), spr_sha, "bytes are sacred");
    drop(r);

    // Till → office: a big report, as a file streamed into the request.
    let rep = big_payload(31, mib << 20);
    let rep_sha = sha256_hex(&rep);
    let body_path = d.path().join("body.b64");
    std::fs::write(&body_path, b64_crlf(&rep)).unwrap();
    drop(rep);
    let len = std::fs::metadata(&body_path).unwrap().len();
    let head = format!(
        "POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
    );
    let t0 = Instant::now();
    let reply = long_request(addr, head.as_bytes(), Some(&body_path)).await;
    let post_took = t0.elapsed();
    assert_eq!(reply.errcode(), "0", "{}", reply.errmessage());
    let t0 = Instant::now();
    while !office.join("POS1.rep.$1").exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sha256_hex(&std::fs::read(office.join("POS1.rep.$1")).unwrap()),
        rep_sha
    );

    let peak = vm_hwm(child.id());
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "{mib} MiB each way: GET {get_took:?}, POST {post_took:?}; peak RSS {} MiB (idle {} MiB)",
        peak >> 20,
        idle >> 20
    );
    assert!(
        peak < 64 << 20,
        "peak RSS {} MiB moving {mib} MiB packages",
        peak >> 20
    );
}

// ---------------------------------------------------------------------------------------
// Replies encoded ahead: when a big package is queued for a till, its reply is encoded in
// the background, so that the till's first ReceiveData streams a ready file.
// ---------------------------------------------------------------------------------------

/// The journal ids of the packages, in order.
fn package_ids(store: &kkm_bridge::store::Store) -> Vec<i64> {
    store
        .with_conn(|c| {
            let mut st = c.prepare("SELECT id FROM package ORDER BY id")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .unwrap()
}

/// The reply file of package `id` under `state`, and whether a temp file (an encoding in
/// progress) is next to it.
fn reply_file(state: &Path, id: i64) -> std::path::PathBuf {
    state.join(format!("tmp/reply-{id}.json"))
}

fn temp_files(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("tmp"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// What identifies one write of a file: its size and modification time.
fn stamp(p: &Path) -> (u64, std::time::SystemTime) {
    let m = std::fs::metadata(p).unwrap();
    (m.len(), m.modified().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_package_is_encoded_when_queued_so_the_first_request_streams_a_ready_file() {
    let b = Bridge::start().await;
    let state = b.root.path().join("state");
    let sprs: Vec<Vec<u8>> = (0..3)
        .map(|i| big_payload(40 + i, (2 << 20) + i as usize))
        .collect();
    for (i, spr) in sprs.iter().enumerate() {
        b.drop_office_file(&format!("POS1.spr.${}", i + 1), spr)
            .await;
    }
    let ids = package_ids(&b.store);
    assert_eq!(ids.len(), 3);
    // Before any request: the till's next package and the one after it are encoded; the
    // third is not (two per till), and no encoding is left running.
    wait_until(Duration::from_secs(120), || {
        reply_file(&state, ids[0]).exists()
            && reply_file(&state, ids[1]).exists()
            && temp_files(&state).is_empty()
    })
    .await;
    assert!(!reply_file(&state, ids[2]).exists(), "two per till");
    assert_eq!(b.scratch_files(), 2);

    // The first request streams the file as it is: not encoded again on the request path.
    let ready = stamp(&reply_file(&state, ids[0]));
    let r = b.get(&format!("{P}/1/1")).await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    assert!(till_decodes(&r) == sprs[0], "bytes are sacred");
    assert!(r.body == std::fs::read(reply_file(&state, ids[0])).unwrap());
    assert_eq!(stamp(&reply_file(&state, ids[0])), ready, "the same file");

    // The next number acknowledges the first: its reply goes, the second was ready, and the
    // third enters the till's window and is encoded ahead in its turn.
    let ready = stamp(&reply_file(&state, ids[1]));
    let r = b.get(&format!("{P}/1/2")).await;
    assert!(till_decodes(&r) == sprs[1]);
    assert_eq!(stamp(&reply_file(&state, ids[1])), ready, "the same file");
    assert!(
        !reply_file(&state, ids[0]).exists(),
        "freed with its package"
    );
    wait_until(Duration::from_secs(120), || {
        reply_file(&state, ids[2]).exists() && temp_files(&state).is_empty()
    })
    .await;
    let ready = stamp(&reply_file(&state, ids[2]));
    let r = b.get(&format!("{P}/1/3")).await;
    assert!(till_decodes(&r) == sprs[2]);
    assert_eq!(stamp(&reply_file(&state, ids[2])), ready, "the same file");

    let r = b.get(&format!("{P}/1/4")).await;
    assert_eq!(r.errcode(), "3");
    assert!(b.journal().iter().all(|r| r.4 == "delivered"));
    assert_eq!(
        b.scratch_files(),
        0,
        "every reply file went with its package"
    );
    assert_eq!(b.spool_files(), 0);
}

/// The real binary on `dir` (office folder `office`, tills over HTTP on `port`), with
/// `env` set.
fn spawn_daemon(dir: &Path, port: u16, env: &[(&str, &str)], log: &str) -> std::process::Child {
    std::fs::create_dir_all(dir.join("office")).unwrap();
    std::fs::write(
        dir.join("b.toml"),
        daemon_config(Path::new("state"), port, ""),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kkm-bridge"));
    cmd.args(["run", "--config", "b.toml"])
        .current_dir(dir)
        .env("RUST_LOG", "kkm_bridge=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn get_reply(addr: std::net::SocketAddr, pos: u32, number: u32) -> Reply {
    long_request(
        addr,
        format!("GET {P}/{pos}/{number} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_encoding_ahead_never_serves_a_half_reply() {
    let d = tempfile::tempdir().unwrap();
    let (office, state) = (d.path().join("office"), d.path().join("state"));
    let port = free_port();

    // 1. The process dies with the whole reply in its temp file, not yet renamed.
    let mut child = spawn_daemon(
        d.path(),
        port,
        &[("KKM_BRIDGE_CRASH_AT", "reply-ahead-before-rename")],
        "run1.log",
    );
    wait_listening(port, Duration::from_secs(20)).await;
    let first = big_payload(50, 3 << 20);
    drop_by_rename(&office, "POS1.spr.$1", &first);
    let status = wait_exit(
        &mut child,
        Duration::from_secs(120),
        "the crash point is reached while encoding ahead",
    )
    .await;
    assert!(!status.success());
    let ids = package_ids(&kkm_bridge::store::Store::open_read_only(&state).unwrap());
    assert_eq!(ids.len(), 1, "the package was taken before the crash");
    let temps = temp_files(&state);
    assert_eq!(temps.len(), 1, "the reply's temp file is left: {temps:?}");
    assert!(!reply_file(&state, ids[0]).exists());
    // What a power cut could leave of a renamed reply whose bytes never reached the disk:
    // its name with half its bytes. Neither may be served.
    let half = std::fs::read(state.join("tmp").join(&temps[0])).unwrap();
    std::fs::write(reply_file(&state, ids[0]), &half[..half.len() / 2]).unwrap();

    let mut child = spawn_daemon(d.path(), port, &[], "run2.log");
    let addr = wait_listening(port, Duration::from_secs(20)).await;
    let r = get_reply(addr, 1, 1).await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    assert_eq!(
        sha256_hex(&data_bytes(&r)),
        sha256_hex(&first),
        "the whole package, not the half reply"
    );
    assert!(
        !state.join("tmp").join(&temps[0]).exists(),
        "the crash's temp file is gone"
    );

    // 2. SIGKILL at a random moment while the next package's reply is being encoded.
    let second = big_payload(51, 32 << 20);
    drop_by_rename(&office, "POS1.spr.$2", &second);
    let t0 = Instant::now();
    let caught = loop {
        let ids = package_ids(&kkm_bridge::store::Store::open_read_only(&state).unwrap());
        if ids.len() == 2 {
            if !temp_files(&state).is_empty() && !reply_file(&state, ids[1]).exists() {
                break true;
            }
            if reply_file(&state, ids[1]).exists() {
                break false; // encoded before we looked: still a valid (weaker) run
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the package is taken"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("killed while encoding ahead: {caught}");

    let mut child = spawn_daemon(d.path(), port, &[], "run3.log");
    let addr = wait_listening(port, Duration::from_secs(20)).await;
    // The till asks for the next number: package 1 is acknowledged, package 2 served whole.
    let r = get_reply(addr, 1, 2).await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    assert_eq!(sha256_hex(&data_bytes(&r)), sha256_hex(&second));
    let r = get_reply(addr, 1, 3).await;
    assert_eq!(r.errcode(), "3");
    let t0 = Instant::now();
    while walk_files(&state.join("tmp")) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "tmp/ empties");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
