//! Test harness: a bridge started in-process (office = a temp folder, tills = KKMTransfer
//! on 127.0.0.1:0) and a raw HTTP/1.1 client that speaks exactly as a till does.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kkm_bridge::config::Config;
use kkm_bridge::endpoint::Endpoint;
use kkm_bridge::pump::Pump;
use kkm_bridge::store::Store;
use kkm_bridge::watch::{self, Daemon, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../support/util.rs"]
mod util;
#[allow(unused_imports)] // each test file uses only some of them
pub use util::{fixture, free_port};

/// The config of the tests: tills 1-10 linked; the login "kassa" may act for 1-20 (so
/// 11-20 are allowed but in no link), "kassa7" only for till 7.
pub fn config_text(root: &Path, http_extra: &str) -> String {
    format!(
        r#"
state_dir = "{root}/state"
[endpoint.office]
type = "dir"
path = "{root}/office"
settle = "0s"
rescan = "1s"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:0"
max_body = "64KiB"
{http_extra}
[[endpoint.tills.user]]
login = "kassa"
password = "secret"
pos = "1-20"
[[endpoint.tills.user]]
login = "kassa7"
password = "p7"
pos = "7"
[[link]]
office = "office"
kassa = "tills"
pos = "1-10"
"#,
        root = root.display()
    )
}

/// A journal row as the tests see it: (kind, pos, source_seq, uid, state).
pub type Row = (String, u32, Option<i64>, Option<String>, String);

pub struct Bridge {
    pub root: tempfile::TempDir,
    pub office: PathBuf,
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bridge {
    pub async fn start() -> Bridge {
        Bridge::start_with("").await
    }

    /// `http_extra`: more keys for [endpoint.tills] (e.g. a prefix).
    pub async fn start_with(http_extra: &str) -> Bridge {
        Bridge::start_config(|root| config_text(root, http_extra)).await
    }

    /// The test config with `max_body` set (big packages) instead of 64 KiB.
    pub async fn start_with_max_body(max_body: &str) -> Bridge {
        Bridge::start_config(|root| {
            config_text(root, "").replace(
                "max_body = \"64KiB\"",
                &format!("max_body = \"{max_body}\""),
            )
        })
        .await
    }

    /// A bridge with the config `config(root)`.
    pub async fn start_config(config: impl FnOnce(&Path) -> String) -> Bridge {
        let root = tempfile::tempdir().unwrap();
        let office = root.path().join("office");
        std::fs::create_dir_all(&office).unwrap();
        let text = config(root.path());
        let config = Arc::new(Config::parse(&text, Path::new("test.toml")).unwrap());
        let store = Arc::new(Store::open(&config.state_dir).unwrap());
        let pump = Arc::new(Pump::new(config, store.clone()).unwrap());
        let ep = pump.endpoints["tills"].clone();
        assert!(matches!(&*ep, Endpoint::Http(_)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let daemon = Daemon::new(pump);
        let (stop, shutdown) = Shutdown::new();
        let task = tokio::spawn(watch::run(daemon, vec![(ep, listener)], shutdown));
        Bridge {
            root,
            office,
            addr,
            store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the daemon gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the daemon stops within 10 s")
                .unwrap();
        }
    }

    pub fn stop_signal(&self) -> tokio::sync::watch::Sender<bool> {
        self.stop.clone().unwrap()
    }

    /// Drops a file into the office folder the way a careful back office does (temp name,
    /// then rename), and waits until the bridge has taken it.
    pub async fn drop_office_file(&self, name: &str, bytes: &[u8]) {
        let tmp = self.office.join(format!("~{name}.part"));
        std::fs::write(&tmp, bytes).unwrap();
        let dest = self.office.join(name);
        std::fs::rename(&tmp, &dest).unwrap();
        wait_until(Duration::from_secs(10), || !dest.exists()).await;
    }

    /// The files in the office folder, sorted.
    pub fn office_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.office)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Journal rows: (kind, pos, source_seq, uid, state).
    pub fn journal(&self) -> Vec<Row> {
        self.store
            .with_conn(|c| {
                let mut st =
                    c.prepare("SELECT kind, pos, source_seq, uid, state FROM package ORDER BY id")?;
                let rows = st.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                rows.collect()
            })
            .unwrap()
    }

    /// Payloads kept by the store: spool files plus payloads inline in journal rows.
    pub fn spool_files(&self) -> usize {
        let inline: i64 = self
            .store
            .with_conn(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM package WHERE payload IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        walk_files(&self.root.path().join("state/spool")) + inline as usize
    }

    /// Files under state/tmp (reply caches, scratch ZIPs).
    pub fn scratch_files(&self) -> usize {
        walk_files(&self.root.path().join("state/tmp"))
    }

    pub async fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, Some(("kassa", "secret")), b"").await
    }

    pub async fn post(&self, path: &str, body: &[u8]) -> Reply {
        request(self.addr, "POST", path, Some(("kassa", "secret")), body).await
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
    }
}

pub fn walk_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            walk_files(&e.path())
        } else {
            1
        }
    })
    .sum()
}

pub async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A parsed HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn errcode(&self) -> String {
        self.json()["errcode"]
            .as_str()
            .expect("errcode is a string")
            .to_string()
    }
    pub fn errmessage(&self) -> String {
        self.json()["errmessage"].as_str().unwrap_or("").to_string()
    }
}

pub fn basic(login: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"))
    )
}

/// One request over a fresh TCP connection, as a till sends it.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &[u8],
) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((l, p)) = auth {
        head.push_str(&format!("Authorization: {}\r\n", basic(l, p)));
    }
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    raw_request(addr, &raw).await
}

/// Sends raw bytes, reads the reply until the server closes.
pub async fn raw_request(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    read_reply(&mut s).await
}

pub async fn read_reply(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("reply within 10 s")
        .unwrap();
    parse_reply(&buf)
}

pub fn parse_reply(buf: &[u8]) -> Reply {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = std::str::from_utf8(&buf[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if let Some((_, len)) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        body.truncate(len.parse().unwrap());
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// The 1C-style base64 a till may send: wrapped with CRLF every 64 characters.
pub fn b64_crlf(bytes: &[u8]) -> Vec<u8> {
    kkm_bridge::package::wrap_base64_crlf(&kkm_bridge::package::encode_plain_base64(bytes))
        .into_bytes()
}

/// The bytes inside a ReceiveData reply's `data`.
pub fn data_bytes(reply: &Reply) -> Vec<u8> {
    let j = reply.json();
    let data = j["data"].as_str().expect("data is a string");
    kkm_bridge::package::decode_package_data(data.as_bytes(), 1 << 30).unwrap()
}

// ------------------------------------------------------------------ the real binary

/// A config for the real binary run in a folder: the office folder `office` (rescan
/// 500 ms) to tills 1-9 over HTTP on 127.0.0.1:`port`, no auth; `tills_extra`: more keys
/// for the tills' endpoint (each ending in a newline).
pub fn daemon_config(state_dir: &Path, port: u16, tills_extra: &str) -> String {
    format!(
        "state_dir = {state_dir:?}\n[endpoint.office]\ntype = \"dir\"\npath = \"office\"\n\
         settle = \"0s\"\nrescan = \"500ms\"\n\
         [endpoint.tills]\ntype = \"http\"\nlisten = \"127.0.0.1:{port}\"\nauth = \"none\"\n\
         {tills_extra}\
         [[link]]\noffice = \"office\"\nkassa = \"tills\"\npos = \"1-9\"\n"
    )
}

/// Waits until the daemon listens on 127.0.0.1:`port`, at most `limit`.
pub async fn wait_listening(port: u16, limit: Duration) -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(t0.elapsed() < limit, "the daemon listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    addr
}

/// Puts a file into a watched folder by rename (`~tmp`, then `name`), so that it is never
/// seen half-written.
pub fn drop_by_rename(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join("~tmp"), bytes).unwrap();
    std::fs::rename(dir.join("~tmp"), dir.join(name)).unwrap();
}

/// Waits until `child` exits, at most `limit` (else fails with `what`).
pub async fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < limit, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
