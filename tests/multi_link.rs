//! Several links in one daemon: a chain of three stores with five tills each, a different
//! method per store, in one config and one `run` (in process: `watch::run`).
//!
//! - store A: a back office writing files (dir) → tills 1-5 over HTTP (KKMTransfer);
//! - store B: a back office on FTP (libunftp) → tills 11-15 reading a folder (dir);
//! - store C: a back office publishing KKMTransfer (`sim::BackOffice`, http-client) →
//!   tills 21-25 on FTP (a second libunftp).
//!
//! Then store B's FTP server goes away: A and C go on moving packages, B's stay queued, and
//! B catches up once its server is back.

#[path = "support/unftp.rs"]
mod unftp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kkm_bridge::config::Config;
use kkm_bridge::package::Kind;
use kkm_bridge::pump::Pump;
use kkm_bridge::sim::{BackOffice, Till};
use kkm_bridge::store::Store;
use kkm_bridge::watch::{self, Daemon, Shutdown};
use unftp::Unftp;

const A: [u32; 5] = [1, 2, 3, 4, 5];
const B: [u32; 5] = [11, 12, 13, 14, 15];
const C: [u32; 5] = [21, 22, 23, 24, 25];
const PREFIX: &str = "/trade/hs/KKMTransfer";

fn spr(p: u32, round: u32) -> Vec<u8> {
    format!("##@@&&$$$RPL\r\n#\r\n{p};round {round};\u{412}\u{43e}\u{434}\u{430};\r\n").into_bytes()
}

fn rep(p: u32, round: u32) -> Vec<u8> {
    let mut v = format!("{round};01.02.24;10:00:00;1;{p};{round};").into_bytes();
    v.extend_from_slice(b"\xCF\xF0\xEE\xE4\xE0\xE6\xE0;\r\n");
    v
}

/// Writes a file as a careful writer does: temp name, then rename.
fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".test-{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn read(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Chain {
    _tmp: tempfile::TempDir,
    a_office: PathBuf,
    b_ftp: Unftp,
    b_tills: PathBuf,
    bo: BackOffice,
    c_ftp: Unftp,
    tills_base: String,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Chain {
    async fn start() -> Chain {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let a_office = root.join("a-office");
        let b_tills = root.join("b-tills");
        let b_ftp = Unftp::start(&root.join("b-ftp"));
        std::fs::create_dir_all(b_ftp.root.join("Files")).unwrap();
        let c_ftp = Unftp::start(&root.join("c-ftp"));
        std::fs::create_dir_all(c_ftp.root.join("Files")).unwrap();
        let bo = BackOffice::new(Some(("bridge".into(), "bo-secret".into())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bo_url = format!("http://{}{PREFIX}", listener.local_addr().unwrap());
        {
            let bo = bo.clone();
            tokio::spawn(async move {
                let _ = bo.serve(listener, PREFIX).await;
            });
        }
        let toml = format!(
            r#"
state_dir = {state:?}

# store A: files from the back office, tills over HTTP
[endpoint.a-office]
type = "dir"
path = {a_office:?}
settle = "0s"
rescan = "200ms"
[endpoint.a-tills]
type = "http"
listen = "127.0.0.1:0"
[[endpoint.a-tills.user]]
login = "kassa"
password = "secret"
pos = "1-5"

# store B: the back office's FTP server, tills reading a folder
[endpoint.b-office]
type = "ftp"
url = {b_url:?}
poll = "100ms"
timeout = "2s"
[endpoint.b-tills]
type = "dir"
path = {b_tills:?}
settle = "0s"
rescan = "200ms"

# store C: a back office publishing KKMTransfer, tills on FTP
[endpoint.c-office]
type = "http-client"
url = {bo_url:?}
login = "bridge"
password = "bo-secret"
poll = "100ms"
timeout = "2s"
[endpoint.c-tills]
type = "ftp"
url = {c_url:?}
poll = "100ms"
timeout = "2s"

[[link]]
name = "store-a"
office = "a-office"
kassa = "a-tills"
pos = "1-5"
[[link]]
name = "store-b"
office = "b-office"
kassa = "b-tills"
pos = "11-15"
[[link]]
name = "store-c"
office = "c-office"
kassa = "c-tills"
pos = "21-25"
"#,
            state = root.join("state"),
            b_url = b_ftp.url("Files"),
            c_url = c_ftp.url("Files"),
        );
        let config = Arc::new(Config::parse(&toml, Path::new("chain.toml")).unwrap());
        assert_eq!(config.links.len(), 3);
        let store = Arc::new(Store::open(&config.state_dir).unwrap());
        let pump = Arc::new(Pump::new(config, store).unwrap());
        let listeners = watch::bind_http(&pump).await;
        assert_eq!(listeners.len(), 1);
        let tills_base = format!(
            "http://{}/hs/KKMTransfer",
            listeners[0].1.local_addr().unwrap()
        );
        let daemon = Daemon::new(pump);
        let (stop, shutdown) = Shutdown::new();
        let task = tokio::spawn(watch::run(daemon, listeners, shutdown));
        // The daemon creates the folders it reads.
        wait_for("folders created", Duration::from_secs(5), || {
            a_office.is_dir() && b_tills.is_dir()
        })
        .await;
        Chain {
            _tmp: tmp,
            a_office,
            b_ftp,
            b_tills,
            bo,
            c_ftp,
            tills_base,
            stop,
            task,
        }
    }

    fn b_files(&self) -> PathBuf {
        self.b_ftp.root.join("Files")
    }

    fn c_files(&self) -> PathBuf {
        self.c_ftp.root.join("Files")
    }

    /// Every back office publishes price list `round` for its tills (B's even while its
    /// FTP server is down: the files wait there).
    fn publish(&self, round: u32) {
        for p in A {
            put(
                &self.a_office,
                &format!("POS{p}.spr.${round}"),
                &spr(p, round),
            );
        }
        for p in B {
            put(
                &self.b_files(),
                &format!("POS{p}.spr.${round}"),
                &spr(p, round),
            );
        }
        for p in C {
            self.bo.queue(p, Kind::Spr, spr(p, round), None);
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the daemon stops")
            .unwrap();
    }
}

/// Store A's tills pull what the bridge has; `got[i]` collects till A[i]'s packages.
async fn a_tills_pull(tills: &mut [Till], got: &mut [Vec<Vec<u8>>]) {
    for (t, g) in tills.iter_mut().zip(got.iter_mut()) {
        for r in t.pull_all().await.unwrap() {
            assert_eq!(r.kind, "spr");
            g.push(r.bytes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stores_in_one_daemon_and_a_failing_ftp_server_stalls_only_its_store() {
    let start = Instant::now();
    let mut chain = Chain::start().await;
    let mut a_tills: Vec<Till> = A
        .iter()
        .map(|&p| {
            Till::new(
                &chain.tills_base,
                p,
                Some(("kassa".into(), "secret".into())),
            )
        })
        .collect();
    let mut a_got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); A.len()];
    let limit = Duration::from_secs(8);

    // ---- round 1: everything flows, down and up, on all three stores
    chain.publish(1);
    let t = Instant::now();
    loop {
        a_tills_pull(&mut a_tills, &mut a_got).await;
        let b_done = B
            .iter()
            .all(|p| read(&chain.b_tills, &format!("POS{p}.spr.$1")).is_some());
        let c_done = C
            .iter()
            .all(|p| read(&chain.c_files(), &format!("POS{p}.spr.$1")).is_some());
        if a_got.iter().all(|g| g.len() == 1) && b_done && c_done {
            break;
        }
        assert!(t.elapsed() < limit, "round 1 down: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, p) in A.iter().enumerate() {
        assert_eq!(a_got[i], vec![spr(*p, 1)], "store A till {p}");
    }
    for p in B {
        assert_eq!(
            read(&chain.b_tills, &format!("POS{p}.spr.$1")).unwrap(),
            spr(p, 1)
        );
    }
    for p in C {
        assert_eq!(
            read(&chain.c_files(), &format!("POS{p}.spr.$1")).unwrap(),
            spr(p, 1)
        );
    }
    // Reports: A's tills post, B's and C's write files.
    for t in a_tills.iter_mut() {
        let p = t.pos;
        assert_eq!(t.send_report(&rep(p, 1), None).await.unwrap(), "0");
    }
    for p in B {
        put(&chain.b_tills, &format!("POS{p}.rep.$1"), &rep(p, 1));
    }
    for p in C {
        put(&chain.c_files(), &format!("POS{p}.rep.$1"), &rep(p, 1));
    }
    let (a_office, b_files, bo) = (chain.a_office.clone(), chain.b_files(), chain.bo.clone());
    wait_for("round 1 reports", limit, || {
        A.iter()
            .all(|p| read(&a_office, &format!("POS{p}.rep.$1")) == Some(rep(*p, 1)))
            && B.iter()
                .all(|p| read(&b_files, &format!("POS{p}.rep.$1")) == Some(rep(*p, 1)))
            && bo.reports().len() == C.len()
    })
    .await;
    for r in bo.reports() {
        assert_eq!(r.bytes, rep(r.pos, 1), "store C report of till {}", r.pos);
    }
    let round1 = start.elapsed();

    // ---- store B's FTP server goes away
    chain.b_ftp.kill();
    chain.publish(2);
    for p in B {
        put(&chain.b_tills, &format!("POS{p}.rep.$2"), &rep(p, 2));
    }
    // A and C go on.
    let t = Instant::now();
    loop {
        a_tills_pull(&mut a_tills, &mut a_got).await;
        let c_done = C
            .iter()
            .all(|p| read(&chain.c_files(), &format!("POS{p}.spr.$2")).is_some());
        if a_got.iter().all(|g| g.len() == 2) && c_done {
            break;
        }
        assert!(
            t.elapsed() < limit,
            "stores A and C while B's FTP is down: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, p) in A.iter().enumerate() {
        assert_eq!(a_got[i], vec![spr(*p, 1), spr(*p, 2)], "store A till {p}");
    }
    // B's reports were taken from its tills' folder (they are safe in the store) and stay
    // queued; its new price lists wait on the server.
    let b_tills = chain.b_tills.clone();
    wait_for("B's reports taken into the store", limit, || {
        B.iter()
            .all(|p| read(&b_tills, &format!("POS{p}.rep.$2")).is_none())
    })
    .await;
    for p in B {
        assert!(read(&chain.b_files(), &format!("POS{p}.rep.$2")).is_none());
        assert!(read(&chain.b_tills, &format!("POS{p}.spr.$2")).is_none());
    }

    // ---- B's server is back: B catches up, nothing lost, nothing doubled
    chain.b_ftp.restart();
    let (b_files, b_tills) = (chain.b_files(), chain.b_tills.clone());
    wait_for("store B after its FTP server is back", limit, || {
        B.iter().all(|p| {
            read(&b_tills, &format!("POS{p}.spr.$2")) == Some(spr(*p, 2))
                && read(&b_files, &format!("POS{p}.rep.$2")) == Some(rep(*p, 2))
        })
    })
    .await;
    let mut b_names: Vec<String> = std::fs::read_dir(&b_files)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    b_names.sort();
    let mut want: Vec<String> = B
        .iter()
        .flat_map(|p| [format!("POS{p}.rep.$1"), format!("POS{p}.rep.$2")])
        .collect();
    want.sort();
    assert_eq!(b_names, want, "B's FTP: its reports, once each; spr taken");
    for p in C {
        assert_eq!(chain.bo.acked(p).len(), 2, "store C till {p}: two packages");
    }
    chain.stop().await;
    eprintln!("round 1 in {round1:?}; whole test in {:?}", start.elapsed());
}
