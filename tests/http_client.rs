//! The bridge as a till (`type = "http-client"`) against the back-office simulator over real
//! sockets: packages pulled by number and acknowledged only once stored, reports posted in
//! order, errcode "1" counted as delivered, an unreachable back office, and a crash between
//! "stored" and "acknowledged" run through the real binary.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kkm_bridge::config::Config;
use kkm_bridge::package::Kind;
use kkm_bridge::pump::Pump;
use kkm_bridge::sim::BackOffice;
use kkm_bridge::store::Store;

#[path = "support/util.rs"]
mod util;
use util::{fixture, noise};

const BIN: &str = env!("CARGO_BIN_EXE_kkm-bridge");

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.unwrap();
                e.file_type().unwrap().is_file().then(|| {
                    (
                        e.file_name().into_string().unwrap(),
                        fs::read(e.path()).unwrap(),
                    )
                })
            })
            .collect()
        })
        .unwrap_or_default()
}

fn put_old(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(5))
        .unwrap();
}

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bo: BackOffice,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Site {
    async fn new(extra: &str) -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let bo = BackOffice::new(Some(("kassa".into(), "secret".into())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/trade/hs/KKMTransfer",
            listener.local_addr().unwrap()
        );
        let server = {
            let bo = bo.clone();
            tokio::spawn(async move {
                let _ = bo.serve(listener, "/trade/hs/KKMTransfer").await;
            })
        };
        fs::write(
            root.join("kkm-bridge.toml"),
            format!(
                r#"
state_dir = "{root}/state"
[endpoint.backoffice]
type = "http-client"
url = "{url}"
login = "kassa"
password = "secret"
timeout = "5s"
{extra}
[endpoint.shop]
type = "dir"
path = "{root}/shop"
settle = "0s"
[[link]]
office = "backoffice"
kassa = "shop"
pos = "1-3"
"#,
                root = root.display()
            ),
        )
        .unwrap();
        fs::create_dir_all(root.join("shop")).unwrap();
        Site {
            _tmp: tmp,
            root,
            bo,
            url,
            server,
        }
    }

    fn config(&self) -> Arc<Config> {
        Arc::new(Config::load(&self.root.join("kkm-bridge.toml")).unwrap())
    }

    /// One pass with a fresh pump (as one `sync` run would do), in process.
    async fn pass(&self) -> kkm_bridge::pump::PassReport {
        let config = self.config();
        let store = Arc::new(Store::open(&config.state_dir).unwrap());
        let pump = Pump::new(config, store).unwrap();
        pump.pass(false).await
    }

    fn shop(&self) -> PathBuf {
        self.root.join("shop")
    }

    async fn sync_binary(&self, crash_at: Option<&str>) -> std::process::Output {
        let mut c = tokio::process::Command::new(BIN);
        c.arg("sync")
            .arg("--config")
            .arg(self.root.join("kkm-bridge.toml"))
            .env("RUST_LOG", "warn");
        if let Some(p) = crash_at {
            c.env("KKM_BRIDGE_CRASH_AT", p);
        }
        c.output().await.unwrap()
    }
}

fn spr(pos: u32, n: u32) -> Vec<u8> {
    let mut b = fixture("POS1.spr.utf8bom");
    b.extend_from_slice(format!("till {pos} package {n}\r\n").as_bytes());
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn back_office_packages_reach_the_till_folder_in_order_and_are_acknowledged() {
    let s = Site::new("").await;
    for pos in 1..=3 {
        for n in 1..=3 {
            s.bo.queue(pos, Kind::Spr, spr(pos, n), None);
        }
    }
    s.bo.queue(2, Kind::Flr, b"flr request".to_vec(), Some("UID-42".into()));
    let r = s.pass().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.taken, r.delivered), (10, 10));
    let shop = files(&s.shop());
    for pos in 1..=3 {
        for n in 1..=3 {
            assert_eq!(shop[&format!("POS{pos}.spr.${n}")], spr(pos, n));
        }
        // Asking for the next number acknowledged every package.
        assert_eq!(s.bo.pending(pos), 0, "till {pos}");
        assert_eq!(s.bo.acked(pos).len(), if pos == 2 { 4 } else { 3 });
    }
    assert_eq!(shop["POS2.flr.$1"], b"flr request");
    // The UID is journaled with the flr.
    let store = Store::open(&s.config().state_dir).unwrap();
    let uid: String = store
        .with_conn(|c| {
            c.query_row("SELECT uid FROM package WHERE kind = 'flr'", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    assert_eq!(uid, "UID-42");
    drop(store);
    // A second pass asks again and takes nothing twice.
    let r = s.pass().await;
    assert_eq!((r.taken, r.delivered), (0, 0));
    assert_eq!(files(&s.shop()).len(), 10);
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_from_the_till_folder_are_posted_in_order_with_numbers() {
    let s = Site::new("").await;
    put_old(&s.shop().join("POS1.rep.$1"), &fixture("POS1.rep.cp1251"));
    put_old(&s.shop().join("POS1.rep.$2"), &fixture("POS1.rep.utf8bom"));
    put_old(&s.shop().join("POS3.rep.$1"), b"till 3 report\r\n");
    let r = s.pass().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(files(&s.shop()).is_empty());
    let mut reports = s.bo.reports();
    reports.sort_by_key(|r| (r.pos, r.number));
    let got: Vec<_> = reports
        .iter()
        .map(|r| (r.pos, r.number, r.bytes.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (1, 1, fixture("POS1.rep.cp1251")),
            (1, 2, fixture("POS1.rep.utf8bom")),
            (3, 1, b"till 3 report\r\n".to_vec()),
        ]
    );
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn zipped_reports_arrive_unchanged() {
    let s = Site::new("report_zip = true").await;
    put_old(&s.shop().join("POS2.rep.$1"), &fixture("POS1.rep.cp1251"));
    let r = s.pass().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(s.bo.reports()[0].bytes, fixture("POS1.rep.cp1251"));
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_back_office_keeps_reports_queued_until_it_answers() {
    let s = Site::new("").await;
    s.server.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    put_old(&s.shop().join("POS1.rep.$1"), b"report 1");
    let o = s.sync_binary(None).await;
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("backoffice"), "{err}");
    assert!(
        ["till 1,", "till 2,", "till 3,"]
            .iter()
            .any(|t| err.contains(t)),
        "the error names the till and number: {err}"
    );
    assert_eq!(
        err.matches("failed").count(),
        1,
        "one line per state change, not one per till: {err}"
    );
    // The back office comes back on the same address.
    let addr = s
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let bo = s.bo.clone();
    let server = tokio::spawn(async move {
        let _ = bo.serve(listener, "/trade/hs/KKMTransfer").await;
    });
    let o = s.sync_binary(None).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(s.bo.reports().len(), 1);
    assert_eq!(s.bo.reports()[0].bytes, b"report 1");
    server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_storing_a_package_does_not_take_it_twice() {
    let s = Site::new("").await;
    s.bo.queue(1, Kind::Spr, spr(1, 1), None);
    s.bo.queue(1, Kind::Spr, spr(1, 2), None);
    let o = s.sync_binary(Some("after-taken")).await;
    assert_eq!(o.status.code(), None, "aborted at the crash point");
    // Package 1 is stored but the back office was not asked for number 2 yet.
    assert_eq!(s.bo.pending(1), 2);
    let o = s.sync_binary(None).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let shop = files(&s.shop());
    assert_eq!(shop.len(), 2, "{:?}", shop.keys());
    assert_eq!(shop["POS1.spr.$1"], spr(1, 1));
    assert_eq!(shop["POS1.spr.$2"], spr(1, 2));
    assert_eq!(s.bo.pending(1), 0);
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_posting_a_report_sends_the_same_number_again() {
    let s = Site::new("").await;
    put_old(&s.shop().join("POS1.rep.$1"), b"report A");
    let o = s.sync_binary(Some("after-delivering")).await;
    assert_eq!(o.status.code(), None);
    assert!(s.bo.reports().is_empty());
    let o = s.sync_binary(None).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let reports = s.bo.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].number, reports[0].bytes.as_slice()),
        (1, &b"report A"[..])
    );
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn already_processed_counts_as_delivered() {
    let s = Site::new("").await;
    // The back office already has report number 1 with these bytes (e.g. sent before a
    // crash that lost the answer).
    let till = kkm_bridge::sim::Till::new(&s.url, 1, Some(("kassa".into(), "secret".into())));
    assert_eq!(
        till.send_report_numbered(b"report A", None, 1)
            .await
            .unwrap(),
        "0"
    );
    put_old(&s.shop().join("POS1.rep.$1"), b"report A");
    let r = s.pass().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.delivered, 1);
    assert_eq!(s.bo.reports().len(), 1, "nothing stored twice");
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_an_error_naming_the_endpoint_and_till() {
    let s = Site::new("").await;
    let cfg = fs::read_to_string(s.root.join("kkm-bridge.toml"))
        .unwrap()
        .replace("password = \"secret\"", "password = \"wrong\"");
    fs::write(s.root.join("kkm-bridge.toml"), cfg).unwrap();
    s.bo.queue(1, Kind::Spr, spr(1, 1), None);
    let o = s.sync_binary(None).await;
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("wrong"), "the password never appears: {err}");
    assert_eq!(s.bo.pending(1), 1);
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn big_packages_are_streamed_both_ways_with_exact_bytes() {
    for zip in [false, true] {
        let s = Site::new(if zip { "report_zip = true" } else { "" }).await;
        // Bigger than INLINE_MAX: decoded from the reply as it arrives, posted as a stream
        // (the simulator takes bodies up to 2 MB).
        let spr = noise(1, 8 << 20);
        let flr = noise(2, 300 << 10);
        let rep = noise(3, 1 << 20);
        s.bo.queue(1, Kind::Spr, spr.clone(), None);
        s.bo.queue(2, Kind::Flr, flr.clone(), Some("UID-9".into()));
        put_old(&s.shop().join("POS3.rep.$1"), &rep);
        let r = s.pass().await;
        assert!(r.errors.is_empty(), "zip {zip}: {:?}", r.errors);
        let shop = files(&s.shop());
        assert!(shop["POS1.spr.$1"] == spr, "zip {zip}: spr bytes");
        assert!(shop["POS2.flr.$1"] == flr, "zip {zip}: flr bytes");
        let reports = s.bo.reports();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].bytes == rep, "zip {zip}: report bytes");
        assert_eq!(s.bo.pending(1), 0, "acknowledged");
        let scratch = s.root.join("state/tmp");
        assert_eq!(
            fs::read_dir(&scratch).unwrap().count(),
            0,
            "no scratch file"
        );
        s.server.abort();
    }
}
