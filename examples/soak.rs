//! Crash soak (scripts/soak-crash): packages flow in every direction while the bridge is
//! SIGKILLed at random moments and restarted; at the end every package must be at its
//! destination exactly once, in order per till, with no temp file left.
//!
//! Links: office folder → HTTP tills 1-3 (KKMTransfer, pulled by number and acknowledged by
//! asking the next one), office folder → folder tills 4-6; reports back from both (SendData
//! and `POS{n}.rep.$k` files). An HTTP till may get the same package twice under the same
//! number (a crash between serving and the ack): that is not "applied twice"; a double is
//! the same content applied under two numbers or two file names.
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

fn config(root: &Path, port: u16) -> String {
    format!(
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
    )
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
    if std::env::var("KKM_TEST_FTP_URL").is_ok_and(|v| !v.is_empty()) {
        eprintln!("note: the FTP leg of the soak is not implemented yet; dir and HTTP legs only");
    } else {
        eprintln!("note: KKM_TEST_FTP_URL not set; FTP leg skipped (dir and HTTP legs only)");
    }

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
    std::fs::write(&cfg, config(&root, port)).unwrap();
    let log = root.join("bridge.log");

    let arrivals: Arrivals = Arc::default();
    let produced_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();

    // Producer: price lists for every till into the office folder; reports of folder tills
    // into the shop folder. Paced so that the kills land in the middle of the flow.
    {
        let (office, shop, done) = (office.clone(), shop.clone(), produced_done.clone());
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
                for pos in DIR_TILLS {
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
                for pos in DIR_TILLS {
                    take(&shop, pos, "spr");
                }
                for pos in HTTP_TILLS.iter().chain(DIR_TILLS.iter()) {
                    take(&office, *pos, "rep");
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
    let expected = (per_till as usize) * (HTTP_TILLS.len() + DIR_TILLS.len()) * 2;
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

    // The verdict.
    let arr = arrivals.lock().unwrap();
    let (mut delivered, mut lost, mut doubled, mut disorder) = (0usize, 0usize, 0usize, 0usize);
    for kind in ["spr", "rep"] {
        for pos in HTTP_TILLS.iter().chain(DIR_TILLS.iter()) {
            let key = format!("{kind} {pos}");
            let got = arr.get(&key).cloned().unwrap_or_default();
            let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
            for (_, b) in &got {
                *seen.entry(b.clone()).or_default() += 1;
            }
            for seq in 1..=per_till {
                match seen.get(&content(kind, *pos, seq)) {
                    None => {
                        lost += 1;
                        eprintln!("LOST {key} seq {seq}");
                    }
                    Some(&k) if k > 1 => {
                        doubled += k - 1;
                        eprintln!("DOUBLED {key} seq {seq} ({k} times)");
                    }
                    _ => {}
                }
            }
            let seqs: Vec<u32> = got.iter().filter_map(|(_, b)| seq_of(b)).collect();
            if seqs.windows(2).any(|w| w[1] <= w[0]) {
                disorder += 1;
                eprintln!("OUT OF ORDER {key}: {seqs:?}");
            }
            delivered += seen.len();
        }
    }
    let temps: Vec<String> = [&office, &shop]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| kkm_bridge::package::is_temp_name(n) || n.starts_with('~'))
        .collect();
    if !temps.is_empty() {
        eprintln!("TEMP FILES LEFT: {temps:?}");
    }
    println!(
        "produced={expected} delivered={delivered} lost={lost} doubled={doubled} out_of_order={disorder} temps_left={} kills={done_kills} seconds={}",
        temps.len(),
        t0.elapsed().as_secs()
    );
    if keep {
        eprintln!("kept: {}", tmp.keep().display());
    }
    let ok = lost == 0 && doubled == 0 && disorder == 0 && temps.is_empty();
    std::process::exit(if ok { 0 } else { 1 });
}
