//! A state_dir that cannot be written (disk full): sources are not acknowledged (files stay
//! where they are, a till's SendData gets errcode "2"), the error is logged once per change
//! of state, and the bridge resumes by itself when space returns, losing and doubling
//! nothing.
//!
//! Writes really fail: the real binary runs with `RLIMIT_FSIZE` lowered (`prlimit`,
//! SIGXFSZ ignored, so a write past the limit fails with EFBIG exactly like ENOSPC for the
//! code), which works without root; as root, a small tmpfs is also mounted for the
//! state_dir and filled, then grown.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_config, data_bytes, drop_by_rename, free_port, request, wait_listening};

const P: &str = "/hs/KKMTransfer";
const LIMIT: u64 = 512 << 10;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_kkm-bridge")
}

fn have_prlimit() -> bool {
    Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `kkm-bridge ARGS` with file writes limited to `LIMIT` bytes (soft limit; the hard limit
/// stays unlimited so that it can be lifted while the process runs).
fn limited(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!(
            "trap '' XFSZ; exec prlimit --fsize={LIMIT}:unlimited -- \"$0\" \"$@\""
        ))
        .arg(exe())
        .args(args)
        .current_dir(dir);
    c
}

/// A package bigger than the limit, unique per `tag`.
fn big(tag: &str) -> Vec<u8> {
    let mut v = format!("##@@&&$$$RPL\r\n#\r\n{tag}\r\n").into_bytes();
    while v.len() < (LIMIT as usize) * 2 {
        v.extend_from_slice(format!("{tag};{};товар;1.00;\r\n", v.len()).as_bytes());
    }
    v
}

/// A state_dir on another filesystem than the office folder (a temp dir under /dev/shm):
/// a big office file is then copied into the spool, so the write limit bites. On the same
/// filesystem it would be hard-linked, which writes no bytes and succeeds whatever the
/// limit (the bytes are durable where they are; that is not what these tests are about).
fn state_elsewhere() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn dir_to_dir_config(state: &Path) -> String {
    format!(
        "state_dir = {state:?}\n[endpoint.office]\ntype = \"dir\"\npath = \"office\"\nsettle = \"0s\"\n\
         [endpoint.shop]\ntype = \"dir\"\npath = \"shop\"\nsettle = \"0s\"\n\
         [[link]]\noffice = \"office\"\nkassa = \"shop\"\npos = \"1-9\"\n"
    )
}

/// `sync` while writes fail: exit 1, the file stays, nothing reaches the shop; `sync` once
/// the fault is gone: delivered exactly once, byte for byte.
fn sync_scenario(dir: &Path, state: &Path, failing: impl Fn() -> Command, heal: impl Fn()) {
    std::fs::create_dir_all(dir.join("office")).unwrap();
    std::fs::write(dir.join("b.toml"), dir_to_dir_config(state)).unwrap();
    let spr = big("sync");
    std::fs::write(dir.join("office/POS1.spr.$1"), &spr).unwrap();
    let out = failing().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ERROR") && err.contains("POS1.spr.$1"),
        "loud: {err}"
    );
    assert_eq!(
        files(&dir.join("office")),
        ["POS1.spr.$1"],
        "the source stays"
    );
    assert!(files(&dir.join("shop")).is_empty());
    assert_eq!(
        common::walk_files(&state.join("spool")),
        0,
        "no partial spool file"
    );
    heal();
    let out = Command::new(exe())
        .args(["sync", "--config", "b.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(files(&dir.join("office")).is_empty());
    assert_eq!(files(&dir.join("shop")), ["POS1.spr.$1"]);
    assert_eq!(std::fs::read(dir.join("shop/POS1.spr.$1")).unwrap(), spr);
}

#[test]
fn sync_with_writes_failing_acknowledges_nothing_and_resumes() {
    if !have_prlimit() {
        eprintln!("note: prlimit (util-linux) not found; skipped");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let elsewhere = state_elsewhere();
    let state = elsewhere.path().join("state");
    sync_scenario(
        d.path(),
        &state,
        || limited(d.path(), &["sync", "--config", "b.toml"]),
        || {},
    );
}

/// As root: the state_dir on a 256 KiB tmpfs, then the tmpfs grown ("space returns").
#[test]
fn sync_on_a_full_tmpfs_acknowledges_nothing_and_resumes_when_space_returns() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mount = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=256k",
            "kkm-test",
            state.to_str().unwrap(),
        ])
        .output();
    if !mount.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("note: cannot mount a tmpfs (not root?); the RLIMIT_FSIZE variant covers this");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(state.clone());
    let p = d.path().to_path_buf();
    sync_scenario(
        d.path(),
        &state,
        || {
            let mut c = Command::new(exe());
            c.args(["sync", "--config", "b.toml"]).current_dir(&p);
            c
        },
        || {
            let ok = Command::new("mount")
                .args(["-o", "remount,size=16m", state.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(ok.success());
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_reports_keeps_files_and_resumes_when_the_limit_is_lifted() {
    if !have_prlimit() {
        eprintln!("note: prlimit (util-linux) not found; skipped");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let elsewhere = state_elsewhere();
    let state = elsewhere.path().join("state");
    let port = free_port();
    let office = d.path().join("office");
    std::fs::create_dir_all(&office).unwrap();
    std::fs::write(d.path().join("b.toml"), daemon_config(&state, port, "")).unwrap();
    let log_path = d.path().join("stderr.log");
    let mut child = limited(d.path(), &["run", "--config", "b.toml"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let addr = wait_listening(port, Duration::from_secs(10)).await;
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // A price list from the office and a report from till 1 while writes fail.
    let spr = big("spr");
    drop_by_rename(&office, "POS1.spr.$1", &spr);
    let rep = big("rep");
    let body = common::b64_crlf(&rep);
    let r = request(addr, "POST", &format!("{P}/SendData/1/1"), None, &body).await;
    assert_eq!(r.errcode(), "2", "not acknowledged: {}", r.errmessage());
    assert!(r.errmessage().contains("повторите"), "{}", r.errmessage());
    // Several rescans pass; the file stays, nothing is served, nothing partial is kept.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(office.join("POS1.spr.$1").exists(), "the source stays");
    let r = request(addr, "GET", &format!("{P}/1/1"), None, b"").await;
    assert_eq!(r.errcode(), "3");
    assert_eq!(common::walk_files(&state.join("spool")), 0);
    let l = log();
    let loud = l
        .lines()
        .filter(|x| x.contains("ERROR") && x.contains("POS1.spr.$1"))
        .count();
    assert_eq!(
        loud, 1,
        "one error per change of state, not one per pass:\n{l}"
    );
    assert!(l.contains("SendData: cannot store the report"), "{l}");

    // Space returns: lift the limit of the running process.
    let ok = Command::new("prlimit")
        .args([
            "--pid",
            &child.id().to_string(),
            "--fsize=unlimited:unlimited",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let t0 = Instant::now();
    while office.join("POS1.spr.$1").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "resumed by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = request(addr, "GET", &format!("{P}/1/1"), None, b"").await;
    assert_eq!(r.errcode(), "0");
    assert_eq!(data_bytes(&r), spr);
    // The till retries its report: now accepted, once.
    let r = request(addr, "POST", &format!("{P}/SendData/1/1"), None, &body).await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    let r = request(addr, "POST", &format!("{P}/SendData/1/1"), None, &body).await;
    assert_eq!(r.errcode(), "1");
    let t0 = Instant::now();
    while files(&office) != ["POS1.rep.$1"] {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "report delivered: {:?}",
            files(&office)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read(office.join("POS1.rep.$1")).unwrap(), rep);
    let r = request(addr, "GET", &format!("{P}/1/2"), None, b"").await;
    assert_eq!(r.errcode(), "3", "acknowledged, nothing more");
    assert!(log().contains("can take files again"), "{}", log());
    let _ = child.kill();
    let _ = child.wait();
}
