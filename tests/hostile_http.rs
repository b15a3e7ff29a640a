//! Hostile input against the running KKMTransfer service (README "Guarantees"): every bad
//! request gets a clear error, nothing crashes, nothing partial is stored, memory stays
//! flat, a slow body neither blocks other tills nor hangs forever, and names from
//! directory or FTP listings can never become write targets outside the configured
//! directories.

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::{basic, Bridge, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const P: &str = "/hs/KKMTransfer";

/// What a case expects back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This HTTP status and a JSON errcode "2".
    Err2(u16),
    /// This HTTP status, whatever the body (protocol-level refusals by the HTTP layer).
    Status(u16),
    /// Any 4xx status (the HTTP layer refuses malformed requests before routing).
    Any4xx,
    /// A 4xx, or errcode "2" (RFC 9112: Transfer-Encoding overrides Content-Length, then
    /// the body is what the chunks say).
    Refused,
}

struct Case {
    name: &'static str,
    raw: Vec<u8>,
    expect: Expect,
}

fn auth() -> String {
    format!("Authorization: {}\r\n", basic("kassa", "secret"))
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n").into_bytes()
}

fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

fn b64(bytes: &[u8]) -> Vec<u8> {
    kkm_bridge::package::encode_plain_base64(bytes).into_bytes()
}

fn zip_entries(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut out);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, opts).unwrap();
            } else {
                w.start_file(*name, opts).unwrap();
                w.write_all(bytes).unwrap();
            }
        }
        w.finish().unwrap();
    }
    out.into_inner()
}

fn cases() -> Vec<Case> {
    let a = auth();
    let rep = b"1;01.01.26;10:00:00;1;1;1;\r\n".as_slice();
    let good = b64(rep);
    let bomb = kkm_bridge::package::zip_one(&vec![0u8; 10 << 20], "bomb.txt");
    assert!(bomb.len() < 64 << 10, "the bomb fits under max_body");
    let nested =
        kkm_bridge::package::zip_one(&kkm_bridge::package::zip_one(rep, "inner.txt"), "outer.zip");
    let two = zip_entries(&[("a.txt", rep), ("b.txt", rep)]);
    let dir_only = zip_entries(&[("d/", b"")]);
    let mut damaged = kkm_bridge::package::zip_one(rep, "r.txt");
    damaged.truncate(damaged.len() / 2);
    let mut junk_b64 = good.clone();
    junk_b64.splice(4..4, b"$%^&*".iter().copied());
    let long_uid = "u".repeat(1000);
    let mut v = vec![
        // ---- authentication
        Case { name: "no Authorization", raw: get(&format!("{P}/1/1"), ""), expect: Expect::Err2(401) },
        Case { name: "wrong password", raw: get(&format!("{P}/1/1"), &format!("Authorization: {}\r\n", basic("kassa", "nope"))), expect: Expect::Err2(401) },
        Case { name: "unknown login", raw: get(&format!("{P}/1/1"), &format!("Authorization: {}\r\n", basic("mallory", "secret"))), expect: Expect::Err2(401) },
        Case { name: "Basic with junk instead of base64", raw: get(&format!("{P}/1/1"), "Authorization: Basic !!!!\r\n"), expect: Expect::Err2(401) },
        Case { name: "Bearer scheme", raw: get(&format!("{P}/1/1"), "Authorization: Bearer abc\r\n"), expect: Expect::Err2(401) },
        Case { name: "credentials that are not UTF-8", raw: get(&format!("{P}/1/1"), &format!("Authorization: Basic {}\r\n", String::from_utf8(b64(b"kassa:\xff\xfe")).unwrap())), expect: Expect::Err2(401) },
        Case { name: "empty password for a known login", raw: get(&format!("{P}/1/1"), &format!("Authorization: {}\r\n", basic("kassa", ""))), expect: Expect::Err2(401) },
        Case { name: "login acting for a till it may not", raw: get(&format!("{P}/3/1"), &format!("Authorization: {}\r\n", basic("kassa7", "p7"))), expect: Expect::Err2(403) },
        Case { name: "SendData without auth", raw: post(&format!("{P}/SendData/1/1"), "", &good), expect: Expect::Err2(401) },
        // ---- header injection, request smuggling, malformed HTTP
        Case { name: "two different Content-Length", raw: format!("POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\n{a}Content-Length: 4\r\nContent-Length: 8\r\n\r\nQUJD").into_bytes(), expect: Expect::Any4xx },
        Case { name: "Content-Length with Transfer-Encoding", raw: format!("POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\n{a}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(), expect: Expect::Refused },
        Case { name: "obs-fold header continuation", raw: format!("GET {P}/1/1 HTTP/1.1\r\nHost: t\r\nAuthorization: Basic\r\n {}\r\n\r\n", &basic("kassa", "secret")[6..]).into_bytes(), expect: Expect::Any4xx },
        Case { name: "control byte in a header", raw: format!("GET {P}/1/1 HTTP/1.1\r\nHost: t\r\nX-Evil: a\x01b\r\n{a}\r\n").into_bytes(), expect: Expect::Any4xx },
        Case { name: "bare LF injection in the request line", raw: format!("GET {P}/1/1\nX-Injected: 1 HTTP/1.1\r\nHost: t\r\n{a}\r\n").into_bytes(), expect: Expect::Any4xx },
        Case { name: "garbage instead of HTTP", raw: b"HELLO KASSA\r\n\r\n".to_vec(), expect: Expect::Any4xx },
        Case { name: "1 MiB header", raw: get(&format!("{P}/1/1"), &format!("{a}X-Big: {}\r\n", "x".repeat(1 << 20))), expect: Expect::Any4xx },
        Case { name: "unknown method", raw: format!("PUT {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{a}Content-Length: 0\r\n\r\n").into_bytes(), expect: Expect::Status(405) },
        Case { name: "unknown path", raw: get(&format!("{P}/Evil/1/1/2"), &a), expect: Expect::Err2(404) },
        // ---- path traversal and odd names in POS / number / UID
        Case { name: "dot-dot segments", raw: get(&format!("{P}/../../etc/passwd"), &a), expect: Expect::Any4xx },
        Case { name: "encoded traversal in POS", raw: get(&format!("{P}/..%2F..%2Fetc/1"), &a), expect: Expect::Err2(200) },
        Case { name: "encoded traversal in number", raw: get(&format!("{P}/1/..%2F1"), &a), expect: Expect::Err2(200) },
        Case { name: "traversal in UID", raw: post(&format!("{P}/SendData/1/1/..%2F..%2Fetc%2Fpasswd"), &a, &good), expect: Expect::Err2(200) },
        Case { name: "backslash in UID", raw: post(&format!("{P}/SendData/1/1/a%5C..%5Cb"), &a, &good), expect: Expect::Err2(200) },
        Case { name: "NUL in POS", raw: get(&format!("{P}/1%00/1"), &a), expect: Expect::Err2(200) },
        Case { name: "NUL in UID", raw: post(&format!("{P}/SendData/1/1/ab%00cd"), &a, &good), expect: Expect::Err2(200) },
        Case { name: "1000-character UID", raw: post(&format!("{P}/SendData/1/1/{long_uid}"), &a, &good), expect: Expect::Err2(200) },
        Case { name: "invalid UTF-8 in POS", raw: get(&format!("{P}/%FF%FE/1"), &a), expect: Expect::Any4xx },
        Case { name: "huge POS", raw: get(&format!("{P}/99999999999999999999999/1"), &a), expect: Expect::Err2(200) },
        Case { name: "huge number", raw: get(&format!("{P}/1/9223372036854775808"), &a), expect: Expect::Err2(200) },
        Case { name: "negative number", raw: get(&format!("{P}/1/-1"), &a), expect: Expect::Err2(200) },
        Case { name: "negative POS", raw: get(&format!("{P}/-1/1"), &a), expect: Expect::Err2(200) },
        Case { name: "plus sign in POS", raw: get(&format!("{P}/+1/1"), &a), expect: Expect::Err2(200) },
        Case { name: "POS 0 (no login may act for it)", raw: get(&format!("{P}/0/1"), &a), expect: Expect::Err2(403) },
        Case { name: "allowed till in no link", raw: post(&format!("{P}/SendData/15/1"), &a, &good), expect: Expect::Err2(200) },
        Case { name: "negative SendData number", raw: post(&format!("{P}/SendData/1/-5"), &a, &good), expect: Expect::Err2(200) },
        // ---- bodies
        Case { name: "declared body over max_body", raw: format!("POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{a}Content-Length: {}\r\n\r\nQUJD", 100u64 << 20).into_bytes(), expect: Expect::Err2(200) },
        Case { name: "empty body", raw: post(&format!("{P}/SendData/1/1"), &a, b""), expect: Expect::Err2(200) },
        Case { name: "not base64", raw: post(&format!("{P}/SendData/1/1"), &a, b"!!! not base64 !!!"), expect: Expect::Err2(200) },
        Case { name: "base64 with junk inside", raw: post(&format!("{P}/SendData/1/1"), &a, &junk_b64), expect: Expect::Err2(200) },
        Case { name: "raw invalid UTF-8 body", raw: post(&format!("{P}/SendData/1/1"), &a, b"\xff\xfe\xfd\x00\x01"), expect: Expect::Err2(200) },
        Case { name: "unterminated JSON string", raw: post(&format!("{P}/SendData/1/1"), &a, b"\"QUJD"), expect: Expect::Err2(200) },
        Case { name: "JSON string of junk", raw: post(&format!("{P}/SendData/1/1"), &a, b"\"#$%\""), expect: Expect::Err2(200) },
        Case { name: "zip bomb (10 MiB of zeros in a small zip)", raw: post(&format!("{P}/SendData/1/1"), &a, &b64(&bomb)), expect: Expect::Err2(200) },
        Case { name: "nested zip", raw: post(&format!("{P}/SendData/1/1"), &a, &b64(&nested)), expect: Expect::Err2(200) },
        Case { name: "zip with two files", raw: post(&format!("{P}/SendData/1/1"), &a, &b64(&two)), expect: Expect::Err2(200) },
        Case { name: "zip with only a directory", raw: post(&format!("{P}/SendData/1/1"), &a, &b64(&dir_only)), expect: Expect::Err2(200) },
        Case { name: "damaged zip", raw: post(&format!("{P}/SendData/1/1"), &a, &b64(&damaged)), expect: Expect::Err2(200) },
        Case { name: "base64 of nothing", raw: post(&format!("{P}/SendData/1/1"), &a, b"===="), expect: Expect::Err2(200) },
    ];
    // A chunked body that grows past max_body (64 KiB) with no Content-Length.
    let mut chunked = format!(
        "POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{a}Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked.extend_from_slice(&[b'Q'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    v.push(Case {
        name: "chunked body over max_body",
        raw: chunked,
        expect: Expect::Err2(200),
    });
    v
}

/// Sends raw bytes; the server may close before reading them all (a refused body).
async fn send_raw(addr: std::net::SocketAddr, raw: &[u8]) -> Option<Reply> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
        Some(common::parse_reply(&buf))
    } else {
        None
    }
}

fn assert_nothing_stored(b: &Bridge, case: &str) {
    assert!(b.journal().is_empty(), "{case}: a journal row was written");
    assert_eq!(b.spool_files(), 0, "{case}: a spool file was left");
    assert!(
        b.office_files().is_empty(),
        "{case}: something reached the office folder: {:?}",
        b.office_files()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_request_gets_a_clear_error_and_stores_nothing() {
    let b = Bridge::start().await;
    let table = cases();
    assert!(table.len() >= 30, "the table has {} cases", table.len());
    for case in &table {
        let reply = send_raw(b.addr, &case.raw).await;
        match case.expect {
            Expect::Err2(status) => {
                let r = reply.unwrap_or_else(|| panic!("{}: no reply", case.name));
                assert_eq!(
                    r.status,
                    status,
                    "{}: {:?}",
                    case.name,
                    String::from_utf8_lossy(&r.body)
                );
                assert_eq!(r.errcode(), "2", "{}", case.name);
                assert!(
                    !r.errmessage().is_empty(),
                    "{}: the error says why",
                    case.name
                );
                assert_eq!(
                    r.header("content-type"),
                    Some("application/json; charset=utf-8"),
                    "{}",
                    case.name
                );
            }
            Expect::Status(status) => {
                let r = reply.unwrap_or_else(|| panic!("{}: no reply", case.name));
                assert_eq!(r.status, status, "{}", case.name);
            }
            Expect::Refused => {
                let r = reply.unwrap_or_else(|| panic!("{}: no reply", case.name));
                assert!(
                    (400..500).contains(&r.status) || r.errcode() == "2",
                    "{}: status {}",
                    case.name,
                    r.status
                );
            }
            Expect::Any4xx => {
                // hyper refuses malformed HTTP with a 4xx, or closes the connection.
                if let Some(r) = reply {
                    assert!(
                        (400..500).contains(&r.status),
                        "{}: status {}",
                        case.name,
                        r.status
                    );
                }
            }
        }
        assert_nothing_stored(&b, case.name);
    }
    // The server is still alive and serves a till normally.
    let r = b.get(&format!("{P}/1/1")).await;
    assert_eq!(r.errcode(), "3");
    let r = b
        .post(&format!("{P}/SendData/1/1"), &b64(b"1;ok;\r\n"))
        .await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
}

/// Resident memory of this process in bytes (/proc/self/statm, field 2, in pages).
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_under_200_oversized_bodies() {
    let b = Bridge::start().await;
    let a = auth();
    let ten_mib = vec![b'Q'; 10 << 20];
    // Warm up (allocator arenas, the runtime's buffers), then measure.
    for _ in 0..5 {
        let raw = post(&format!("{P}/SendData/1/1"), &a, &ten_mib);
        send_raw(b.addr, &raw).await;
    }
    let before = rss();
    let t0 = Instant::now();
    for i in 0..200 {
        // Half declare their size, half stream chunked without declaring it.
        let raw = if i % 2 == 0 {
            post(&format!("{P}/SendData/1/1"), &a, &ten_mib)
        } else {
            let mut v = format!(
                "POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{a}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                ten_mib.len()
            )
            .into_bytes();
            v.extend_from_slice(&ten_mib);
            v.extend_from_slice(b"\r\n0\r\n\r\n");
            v
        };
        let r = send_raw(b.addr, &raw).await.expect("a reply");
        assert_eq!(r.errcode(), "2");
    }
    let after = rss();
    let growth = after.saturating_sub(before);
    eprintln!(
        "RSS before {} MiB, after {} MiB, growth {} KiB, 200 bodies in {:?}",
        before >> 20,
        after >> 20,
        growth >> 10,
        t0.elapsed()
    );
    assert!(growth < 32 << 20, "RSS grew by {} MiB", growth >> 20);
    assert_nothing_stored(&b, "oversized bodies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_body_is_cut_off_and_blocks_no_other_till() {
    let b = Bridge::start_with("body_timeout = \"1s\"").await;
    let a = auth();
    let addr = b.addr;
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {P}/SendData/1/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{a}Content-Length: 1000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let t0 = Instant::now();
        // One byte every 100 ms: 1000 bytes would take 100 s.
        let mut reply = Vec::new();
        for _ in 0..1000 {
            if s.write_all(b"Q").await.is_err() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    reply.extend_from_slice(&chunk[..n]);
                    if reply.windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut reply))
                                .await;
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        (t0.elapsed(), reply)
    });
    // Meanwhile other tills are served at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for pos in [2, 3] {
        let t0 = Instant::now();
        let r = b.get(&format!("{P}/{pos}/1")).await;
        assert_eq!(r.errcode(), "3");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
    let r = b
        .post(&format!("{P}/SendData/2/1"), &b64(b"1;fast;\r\n"))
        .await;
    assert_eq!(r.errcode(), "0");
    let (took, reply) = slow.await.unwrap();
    assert!(took < Duration::from_secs(5), "cut off after {took:?}");
    let r = common::parse_reply(&reply);
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage().contains("body_timeout"),
        "{}",
        r.errmessage()
    );
    // Only the fast till's report is stored.
    let j = b.journal();
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].1, 2);
}

/// Names from a directory or an FTP listing are parsed against the configured patterns;
/// anything with a separator, a `..`, a NUL, a backslash or a non-canonical number is no
/// package name, so it can never become a write target.
#[test]
fn names_from_listings_never_escape_the_configured_directories() {
    use kkm_bridge::package::NamePattern;
    let p = NamePattern::new("POS{pos}.spr").unwrap();
    let hostile = [
        "../x",
        "../POS1.spr.$1",
        "POS1.spr.$1/../../etc",
        "POS1.spr.$1/x",
        "POS1.spr.$1\\..\\x",
        "POS1.spr.$1\0",
        "POS1\0.spr.$1",
        "/etc/POS1.spr.$1",
        "POS../1.spr.$1",
        "POS1.spr.$-1",
        "POS1.spr.$+1",
        "POS1.spr.$01",
        "POS01.spr.$1",
        "POS1.spr.$0",
        "POS1.spr.$99999999999999999999",
        "POS99999999999999999999.spr.$1",
        "POS1.spr.$1 ",
        "POS1.spr.$1\n",
        "POS1.spr.$١",
    ];
    for name in hostile {
        assert_eq!(p.parse(name, true), None, "{name:?} parsed");
        assert_eq!(p.parse(name, false), None, "{name:?} parsed (single-file)");
    }
    let long = format!("POS1.spr.${}", "9".repeat(100_000));
    assert_eq!(p.parse(&long, true), None);
    // Patterns that would let a name escape are refused in the config.
    for bad in [
        "../POS{pos}",
        "a/POS{pos}",
        "a\\POS{pos}",
        "POS{pos}\0",
        ".POS{pos}",
        "POS{pos}.$",
    ] {
        assert!(NamePattern::new(bad).is_err(), "{bad:?} accepted");
    }
    // Whatever number comes in, a rendered name is one plain file name.
    for (pos, n) in [(0, Some(1)), (u32::MAX, Some(u32::MAX)), (7, None)] {
        let name = p.render(pos, n);
        assert!(
            !name.contains(['/', '\\', '\0']) && !name.contains(".."),
            "{name}"
        );
    }
}

/// A directory endpoint over a folder full of hostile names (subdirectories named like
/// packages, links to the outside, odd names): none of them is taken or written through,
/// and nothing appears outside the configured folders.
#[test]
fn a_directory_full_of_hostile_names_writes_nothing_outside() {
    let root = tempfile::tempdir().unwrap();
    let office = root.path().join("office");
    let shop = root.path().join("shop");
    let outside = root.path().join("outside");
    for d in [&office, &shop, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    // A directory named like a package, with a package-like file inside.
    std::fs::create_dir_all(office.join("POS1.spr.$1")).unwrap();
    std::fs::write(office.join("POS1.spr.$1/POS1.spr.$1"), b"inner").unwrap();
    std::fs::write(office.join("POS1.spr.$1 "), b"trailing space").unwrap();
    std::fs::write(office.join("POS1.spr.$01"), b"leading zero").unwrap();
    std::fs::write(office.join("..POS1.spr.$2"), b"dots").unwrap();
    std::fs::write(office.join("POS1.spr.$2\\..\\x"), b"backslash").unwrap();
    // A symlink at the kassa side pointing outside, named like a package: it is not
    // written through (the number above it is taken, or a rename would replace the link).
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.join("x"), shop.join("POS1.spr.$1")).unwrap();
    // One real package.
    std::fs::write(office.join("POS1.spr.$3"), b"##@@&&\n#\nreal\n").unwrap();
    let cfg = format!(
        "state_dir = {:?}\n[endpoint.office]\ntype = \"dir\"\npath = {:?}\nsettle = \"0s\"\n\
         [endpoint.shop]\ntype = \"dir\"\npath = {:?}\nsettle = \"0s\"\n\
         [[link]]\noffice = \"office\"\nkassa = \"shop\"\npos = \"1-9\"\n",
        root.path().join("state"),
        office,
        shop
    );
    let cfg_path = root.path().join("b.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kkm-bridge"))
        .args(["sync", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&shop)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["POS1.spr.$1", "POS1.spr.$2"]);
    assert!(std::fs::symlink_metadata(shop.join("POS1.spr.$1"))
        .unwrap()
        .is_symlink());
    let written = shop.join("POS1.spr.$2");
    assert!(
        std::fs::symlink_metadata(&written).unwrap().is_file(),
        "a plain file"
    );
    assert_eq!(std::fs::read(&written).unwrap(), b"##@@&&\n#\nreal\n");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside"
    );
    // The hostile office entries are all still there, untouched.
    assert_eq!(
        std::fs::read(office.join("POS1.spr.$1/POS1.spr.$1")).unwrap(),
        b"inner"
    );
    assert!(office.join("POS1.spr.$01").exists());
    assert!(office.join("..POS1.spr.$2").exists());
    assert!(!office.join("POS1.spr.$3").exists());
}
