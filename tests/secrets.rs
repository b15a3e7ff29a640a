//! Passwords never appear in logs (debug level included), in `validate`/`check`/`sync`
//! output, on the status page or in /status.json — whether they come from the config
//! (`password = "..."`), from the environment (`password_env`) or are typed wrong by a till.

mod common;

use common::free_port;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECRETS: [&str; 5] = [
    "FtpPw-7c1d",
    "TillPw-91ab",
    "EnvPw-5e3f",
    "ClientPw-2b7a",
    "AdminPw-0d4c",
];

fn config(http: u16, admin: u16, dead: u16) -> String {
    format!(
        r#"
state_dir = "state"
[admin]
listen = "127.0.0.1:{admin}"
login = "admin"
password = "{a}"
[endpoint.office]
type = "dir"
path = "office"
settle = "0s"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:{http}"
[[endpoint.tills.user]]
login = "kassa"
password = "{t}"
pos = "1-5"
[[endpoint.tills.user]]
login = "kassa2"
password_env = "KKM_TEST_SECRET_ENV"
pos = "6-9"
[endpoint.shopftp]
type = "ftp"
url = "ftp://kassa@127.0.0.1:{dead}/Files"
password = "{f}"
timeout = "2s"
[endpoint.bo]
type = "http-client"
url = "http://127.0.0.1:{dead}/hs/KKMTransfer"
login = "bo"
password = "{c}"
timeout = "2s"
[[link]]
office = "office"
kassa = "tills"
pos = "1-9"
[[link]]
name = "ftp"
office = "bo"
kassa = "shopftp"
pos = "10"
"#,
        a = SECRETS[4],
        t = SECRETS[1],
        f = SECRETS[0],
        c = SECRETS[3],
    )
}

fn assert_clean(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows the password {s}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_logs_output_or_the_status_page() {
    let d = tempfile::tempdir().unwrap();
    let (http, admin, dead) = (free_port(), free_port(), free_port());
    std::fs::write(d.path().join("b.toml"), config(http, admin, dead)).unwrap();
    let exe = env!("CARGO_BIN_EXE_kkm-bridge");
    let cmd = |args: &[&str]| {
        let o = Command::new(exe)
            .args(args)
            .args(["--config", "b.toml"])
            .current_dir(d.path())
            .env("KKM_TEST_SECRET_ENV", SECRETS[2])
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    for args in [
        &["validate"][..],
        &["check"],
        &["sync"],
        &["sync", "--dry-run"],
        &["status"],
        &["status", "--json"],
    ] {
        let out = cmd(args);
        assert_clean(&format!("`{}`", args.join(" ")), &out);
    }
    // `check` names the unreachable endpoints (so the test really exercised them).
    let out = cmd(&["check"]);
    assert!(out.contains("shopftp") && out.contains("bo"), "{out}");

    // The daemon at trace level, with tills sending right and wrong passwords.
    let log_path = d.path().join("run.log");
    let mut child = Command::new(exe)
        .args(["run", "--config", "b.toml"])
        .current_dir(d.path())
        .env("KKM_TEST_SECRET_ENV", SECRETS[2])
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(admin_addr).await.is_err()
        || tokio::net::TcpStream::connect(addr).await.is_err()
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "the daemon listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = "/hs/KKMTransfer";
    let r = common::request(
        addr,
        "GET",
        &format!("{p}/1/1"),
        Some(("kassa", SECRETS[1])),
        b"",
    )
    .await;
    assert_eq!(r.errcode(), "3");
    let r = common::request(
        addr,
        "GET",
        &format!("{p}/6/1"),
        Some(("kassa2", SECRETS[2])),
        b"",
    )
    .await;
    assert_eq!(r.errcode(), "3");
    // A wrong password that looks like another one: not echoed in the reply or the log.
    let r = common::request(
        addr,
        "GET",
        &format!("{p}/1/1"),
        Some(("kassa", SECRETS[3])),
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_clean("a 401 reply", &String::from_utf8_lossy(&r.body));
    for path in ["/status", "/status.json", "/metrics"] {
        let r = common::request(admin_addr, "GET", path, Some(("admin", SECRETS[4])), b"").await;
        assert_eq!(r.status, 200, "{path}");
        assert_clean(path, &String::from_utf8_lossy(&r.body));
    }
    // Let the FTP and http-client endpoints fail a few times (their errors are logged).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("shopftp"),
        "the FTP endpoint was exercised:\n{log}"
    );
    assert_clean("the daemon's trace log", &log);
}
