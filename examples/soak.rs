//! Crash soak (scripts/soak-crash): packages flow in every direction while the bridge is
//! SIGKILLed at random moments and restarted; at the end every package must be at its
//! destination exactly once, in order per till, with no temp file left.
//!
//! Links: office folder → HTTP tills 1-3 (KKMTransfer, pulled by number and acknowledged by
//! asking the next one), office folder → folder tills 4-6; reports back from both (SendData
//! and `POS{n}.rep.$k` files). With `KKM_TEST_FTP_URL` set (scripts/ftp-server start) also
//! an FTP office → folder tills 7-9: the driver plays the back office on the FTP server's
//! disk (a directory `soak-<pid>` of its own under the URL's directory, price lists written
//! under a dot name and renamed, reports collected from there as `POS{n}.rep.$k`). The FTP
//! root on disk is read from scripts/ftp-server's state (`KKM_FTP_STATE_DIR`, default
//! /tmp/kkm-ftp-state); `KKM_SOAK_FTP_DIR` names the URL's directory on disk instead.
//!
//! An HTTP till may get the same package twice under the same number (a crash between
//! serving and the ack): that is not "applied twice"; a double is the same content applied
//! under two numbers or two file names. Counts are printed per leg and in total.
//!
//! Usage: soak --bin PATH [--kills N] [--quick] [--per-till N]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

const HTTP_TILLS: [u32; 3] = [1, 2, 3];
const DIR_TILLS: [u32; 3] = [4, 5, 6];
/// Folder tills whose office is the FTP server (the FTP leg).
const FTP_TILLS: [u32; 3] = [7, 8, 9];
const P: &str = "/hs/KKMTransfer";

/// What reached a destination: per stream ("spr 1", "rep 4", …), the contents in arrival
/// order with the number or name they came under.
type Arrivals = Arc<Mutex<BTreeMap<String, Vec<(String, Vec<u8>)>>>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn content(kind: &str, pos: u32, seq: u32) -> Vec<u8> {
    let head = if kind == "spr" { "##@@&&\r\n#\r\n" } else { "" };
    format!(
        "{head}soak {kind} pos={pos} seq={seq:05} {}\r\n",
        "x".repeat(seq as usize % 300)
    )
    .into_bytes()
}

fn seq_of(bytes: &[u8]) -> Option<u32> {
    let s = String::from_utf8_lossy(bytes);
    let i = s.find("seq=")?;
    s[i + 4..i + 9].parse().ok()
}

/// Writes a file the careful way: temp name, then rename.
fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!("~{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The same on the FTP server's disk, with a dot name as the temp (the bridge's FTP reader
/// never matches a leading dot).
fn put_dot(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".~{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The FTP leg: the endpoint's URL and the same directory on the server's disk.
struct FtpLeg {
    url: String,
    disk: PathBuf,
}

/// Sets up the FTP leg from `KKM_TEST_FTP_URL`, or says why there is none.
fn ftp_leg() -> Result<FtpLeg, String> {
    let url = std::env::var("KKM_TEST_FTP_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or("KKM_TEST_FTP_URL not set")?;
    let url = url.trim_end_matches('/').to_string();
    let path = url
        .strip_prefix("ftp://")
        .and_then(|r| r.split_once('/'))
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    let base = match std::env::var("KKM_SOAK_FTP_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let state =
                std::env::var("KKM_FTP_STATE_DIR").unwrap_or_else(|_| "/tmp/kkm-ftp-state".into());
            let root = std::fs::read_to_string(Path::new(&state).join("root")).map_err(|e| {
                format!("the FTP root on disk is unknown ({state}/root: {e}); set KKM_SOAK_FTP_DIR")
            })?;
            Path::new(root.trim()).join(&path)
        }
    };
    if !base.is_dir() {
        return Err(format!(
            "{} (the URL's directory on disk) does not exist; set KKM_SOAK_FTP_DIR",
            base.display()
        ));
    }
    let sub = format!("soak-{}", std::process::id());
    let disk = base.join(&sub);
    std::fs::create_dir(&disk).map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
    // The FTP user must delete the price lists and write the reports: give it the directory
    // (the owner of the URL's directory is that user), or failing that let everyone write.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let owner = std::fs::metadata(&base).map_err(|e| e.to_string())?;
    if std::os::unix::fs::chown(&disk, Some(owner.uid()), Some(owner.gid())).is_err() {
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("cannot open {} to the FTP user: {e}", disk.display()))?;
    }
    Ok(FtpLeg {
        url: format!("{url}/{sub}"),
        disk,
    })
}

/// `PREFIX{pos}.KIND.$n` files in `dir` for one till, lowest number first.
fn numbered(dir: &Path, pos: u32, kind: &str) -> Vec<(u32, PathBuf)> {
    let prefix = format!("POS{pos}.{kind}.$");
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// One HTTP request; None when the bridge is down.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    serde_json::from_slice(&buf[end + 4..]).ok()
}

fn config(root: &Path, port: u16, ftp: Option<&FtpLeg>) -> String {
    let mut c = format!(
        r#"
state_dir = "{r}/state"
[endpoint.office]
type = "dir"
path = "{r}/office"
settle = "0s"
rescan = "200ms"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:{port}"
auth = "none"
[endpoint.shop]
type = "dir"
path = "{r}/shop"
settle = "0s"
rescan = "200ms"
[[link]]
name = "http"
office = "office"
kassa = "tills"
pos = "1-3"
[[link]]
name = "dir"
office = "office"
kassa = "shop"
pos = "4-6"
"#,
        r = root.display()
    );
    if let Some(ftp) = ftp {
        c += &format!(
            r#"
[endpoint.officeftp]
type = "ftp"
url = "{url}"
poll = "200ms"
timeout = "10s"
[[link]]
name = "ftp"
office = "officeftp"
kassa = "shop"
pos = "7-9"
"#,
            url = ftp.url
        );
    }
    c
}

/// Lost, doubled, out-of-order and temp counts of one leg or of all.
#[derive(Default)]
struct Count {
    produced: usize,
    delivered: usize,
    lost: usize,
    doubled: usize,
    disorder: usize,
    temps: usize,
}

impl Count {
    fn add(&mut self, o: &Count) {
        self.produced += o.produced;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.doubled += o.doubled;
        self.disorder += o.disorder;
        self.temps += o.temps;
    }

    fn line(&self) -> String {
        format!(
            "produced={} delivered={} lost={} doubled={} out_of_order={} temps_left={}",
            self.produced, self.delivered, self.lost, self.doubled, self.disorder, self.temps
        )
    }
}

fn start(bin: &str, cfg: &Path, log: &Path) -> Child {
    Command::new(bin)
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .expect("start the bridge")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = arg(&args, "--bin").expect("--bin PATH of kkm-bridge");
    let quick = args.iter().any(|a| a == "--quick");
    let kills: u32 = arg(&args, "--kills")
        .map(|v| v.parse().unwrap())
        .unwrap_or(if quick { 50 } else { 200 });
    let per_till: u32 = arg(&args, "--per-till")
        .map(|v| v.parse().unwrap())
        .unwrap_or(if quick { 40 } else { 150 });
    let ftp = match ftp_leg() {
        Ok(leg) => {
            eprintln!(
                "FTP leg: on (FTP office {} = {} on disk → folder tills {}-{}, reports back)",
                leg.url.split_once('@').map_or(leg.url.as_str(), |(_, h)| h),
                leg.disk.display(),
                FTP_TILLS[0],
                FTP_TILLS[FTP_TILLS.len() - 1]
            );
            Some(leg)
        }
        Err(why) => {
            eprintln!("FTP leg: skipped ({why}); dir and HTTP legs only");
            None
        }
    };
    let ftp_dir = ftp.as_ref().map(|l| l.disk.clone());
    let ftp_tills: &'static [u32] = if ftp.is_some() { &FTP_TILLS } else { &[] };
    let file_tills: Vec<u32> = DIR_TILLS.iter().chain(ftp_tills).copied().collect();
    let all_tills: Vec<u32> = HTTP_TILLS.iter().chain(&file_tills).copied().collect();

    let keep = std::env::var("KKM_SOAK_KEEP").is_ok();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let (office, shop) = (root.join("office"), root.join("shop"));
    std::fs::create_dir_all(&office).unwrap();
    std::fs::create_dir_all(&shop).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = root.join("soak.toml");
    std::fs::write(&cfg, config(&root, port, ftp.as_ref())).unwrap();
    let log = root.join("bridge.log");

    let arrivals: Arrivals = Arc::default();
    let produced_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();

    // Producer: price lists for every till into the office folder; reports of folder tills
    // into the shop folder. Paced so that the kills land in the middle of the flow.
    {
        let (office, shop, done) = (office.clone(), shop.clone(), produced_done.clone());
        let (ftp_dir, file_tills) = (ftp_dir.clone(), file_tills.clone());
        // Spread the production over the kills (about 0.6 s between kills).
        let pace = (u64::from(kills) * 600 / u64::from(per_till.max(1))).max(20);
        threads.push(std::thread::spawn(move || {
            let mut rng = rand::thread_rng();
            for seq in 1..=per_till {
                for pos in HTTP_TILLS.iter().chain(DIR_TILLS.iter()) {
                    put(
                        &office,
                        &format!("POS{pos}.spr.${seq}"),
                        &content("spr", *pos, seq),
                    );
                }
                if let Some(ftp_dir) = &ftp_dir {
                    for pos in ftp_tills {
                        put_dot(
                            ftp_dir,
                            &format!("POS{pos}.spr.${seq}"),
                            &content("spr", *pos, seq),
                        );
                    }
                }
                for &pos in &file_tills {
                    put(
                        &shop,
                        &format!("POS{pos}.rep.${seq}"),
                        &content("rep", pos, seq),
                    );
                }
                std::thread::sleep(Duration::from_millis(rng.gen_range(pace / 2..pace * 3 / 2)));
            }
            done.store(true, Ordering::SeqCst);
        }));
    }
    // HTTP tills: pull by number (asking n+1 acknowledges n), send reports by number.
    for pos in HTTP_TILLS {
        let (arr, stop) = (arrivals.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut n: i64 = 1;
            let mut sent: u32 = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut idle = true;
                if let Some(j) = http(addr, "GET", &format!("{P}/{pos}/{n}"), b"") {
                    if j["errcode"] == "0" {
                        let data = j["data"].as_str().unwrap_or("");
                        let bytes =
                            kkm_bridge::package::decode_package_data(data.as_bytes(), 1 << 24)
                                .expect("served data decodes");
                        let mut a = arr.lock().unwrap();
                        let v = a.entry(format!("spr {pos}")).or_default();
                        // The same number again after a crash: the till already has it.
                        if v.last().map(|(k, _)| k.as_str()) != Some(&n.to_string()) {
                            v.push((n.to_string(), bytes));
                        }
                        n += 1;
                        idle = false;
                    }
                }
                if sent < per_till {
                    let seq = sent + 1;
                    let body = kkm_bridge::package::encode_plain_base64(&content("rep", pos, seq));
                    if let Some(j) = http(
                        addr,
                        "POST",
                        &format!("{P}/SendData/{pos}/{seq}"),
                        body.as_bytes(),
                    ) {
                        if j["errcode"] == "0" || j["errcode"] == "1" {
                            sent += 1;
                            idle = false;
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(30));
                }
            }
        }));
    }
    // Folder tills take their price lists; the office takes the reports; lowest number first.
    {
        let (arr, stop, office, shop) =
            (arrivals.clone(), stop.clone(), office.clone(), shop.clone());
        let (ftp_dir, file_tills) = (ftp_dir.clone(), file_tills.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let mut any = false;
                let mut take = |dir: &Path, pos: u32, kind: &str| {
                    for (n, path) in numbered(dir, pos, kind) {
                        let Ok(bytes) = std::fs::read(&path) else {
                            continue;
                        };
                        std::fs::remove_file(&path).unwrap();
                        arr.lock()
                            .unwrap()
                            .entry(format!("{kind} {pos}"))
                            .or_default()
                            .push((format!("$ {n}"), bytes));
                        any = true;
                    }
                };
                for &pos in &file_tills {
                    take(&shop, pos, "spr");
                }
                for pos in HTTP_TILLS.iter().chain(DIR_TILLS.iter()) {
                    take(&office, *pos, "rep");
                }
                if let Some(ftp_dir) = &ftp_dir {
                    for &pos in ftp_tills {
                        take(ftp_dir, pos, "rep");
                    }
                }
                if !any {
                    std::thread::sleep(Duration::from_millis(30));
                }
            }
        }));
    }

    // The killer.
    let t0 = Instant::now();
    let mut rng = rand::thread_rng();
    let mut child = start(&bin, &cfg, &log);
    let mut done_kills = 0;
    while done_kills < kills {
        let wait = if produced_done.load(Ordering::SeqCst) {
            rng.gen_range(50..700)
        } else {
            rng.gen_range(50..1200)
        };
        std::thread::sleep(Duration::from_millis(wait));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        done_kills += 1;
        child = start(&bin, &cfg, &log);
    }
    // Let it finish.
    let expected = (per_till as usize) * all_tills.len() * 2;
    let deadline = Instant::now() + Duration::from_secs(if quick { 90 } else { 300 });
    loop {
        let got: usize = arrivals.lock().unwrap().values().map(Vec::len).sum();
        if (produced_done.load(Ordering::SeqCst) && got >= expected) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500)); // anything extra (a double) shows up
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let _ = child.kill();
    let _ = child.wait();

    // The verdict, per leg and in total.
    let arr = arrivals.lock().unwrap();
    let mut legs: Vec<(&str, Vec<u32>, Vec<PathBuf>)> = vec![
        ("http", HTTP_TILLS.to_vec(), vec![office.clone()]),
        ("dir", DIR_TILLS.to_vec(), vec![shop.clone()]),
    ];
    if let Some(d) = &ftp_dir {
        legs.push(("ftp", FTP_TILLS.to_vec(), vec![d.clone()]));
    }
    let mut total = Count::default();
    for (leg, tills, dirs) in &legs {
        let mut c = Count::default();
        for kind in ["spr", "rep"] {
            for pos in tills {
                let key = format!("{kind} {pos}");
                let got = arr.get(&key).cloned().unwrap_or_default();
                let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
                for (_, b) in &got {
                    *seen.entry(b.clone()).or_default() += 1;
                }
                for seq in 1..=per_till {
                    c.produced += 1;
                    match seen.get(&content(kind, *pos, seq)) {
                        None => {
                            c.lost += 1;
                            eprintln!("LOST {key} seq {seq}");
                        }
                        Some(&k) if k > 1 => {
                            c.doubled += k - 1;
                            eprintln!("DOUBLED {key} seq {seq} ({k} times)");
                        }
                        _ => {}
                    }
                }
                let seqs: Vec<u32> = got.iter().filter_map(|(_, b)| seq_of(b)).collect();
                if seqs.windows(2).any(|w| w[1] <= w[0]) {
                    c.disorder += 1;
                    eprintln!("OUT OF ORDER {key}: {seqs:?}");
                }
                c.delivered += seen.len();
            }
        }
        // Temp files: the bridge's, the producer's (`~…` in folders, `.~…` on FTP), any dot
        // file on the FTP server. Folders shared by legs count under one of them.
        let temps: Vec<String> = dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap())
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                kkm_bridge::package::is_temp_name(n) || n.starts_with('~') || n.starts_with('.')
            })
            .collect();
        if !temps.is_empty() {
            eprintln!("TEMP FILES LEFT ({leg} leg): {temps:?}");
        }
        c.temps = temps.len();
        println!("leg {leg}: {}", c.line());
        total.add(&c);
    }
    if ftp_dir.is_none() {
        println!("leg ftp: skipped (KKM_TEST_FTP_URL not set or not usable, see above)");
    }
    println!(
        "produced={} delivered={} lost={} doubled={} out_of_order={} temps_left={} kills={done_kills} seconds={} ftp_leg={}",
        total.produced,
        total.delivered,
        total.lost,
        total.doubled,
        total.disorder,
        total.temps,
        t0.elapsed().as_secs(),
        if ftp_dir.is_some() { "ran" } else { "skipped" }
    );
    if let Some(d) = &ftp_dir {
        if keep {
            eprintln!("kept: {}", d.display());
        } else {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    if keep {
        eprintln!("kept: {}", tmp.keep().display());
    }
    let ok = total.lost == 0 && total.doubled == 0 && total.disorder == 0 && total.temps == 0;
    std::process::exit(if ok { 0 } else { 1 });
}
