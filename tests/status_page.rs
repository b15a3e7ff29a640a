//! The admin listener over a real store while packages move between two real exchange
//! directories: `/status` rendered by a real headless browser (Debian's chromium, when
//! installed: screenshot + DOM checked against the journal), Basic auth, filters, paging
//! with 5,000 tills, HTML escaping, and `/metrics`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kkm_bridge::config::Config;
use kkm_bridge::pump::Pump;
use kkm_bridge::status::{AdminState, Live};
use kkm_bridge::store::Store;

const CHROMIUM: &str = "/usr/bin/chromium";

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    config: Arc<Config>,
    store: Arc<Store>,
}

/// A link named with HTML in it (names come from users), office dir → shop dir in
/// single-file mode, so that an unconsumed file keeps the next package queued.
fn site(pos: &str, admin: &str) -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let text = format!(
        r#"
state_dir = "{root}/state"
[endpoint.office]
type = "dir"
path = "{root}/office"
settle = "0s"
[endpoint.shop1]
type = "dir"
path = "{root}/shop1"
numbered = false
settle = "0s"
[[link]]
name = "shop<1>&co"
office = "office"
kassa = "shop1"
pos = "{pos}"
{admin}
"#,
        root = root.display()
    );
    fs::create_dir_all(root.join("office")).unwrap();
    fs::create_dir_all(root.join("shop1")).unwrap();
    let config = Arc::new(Config::parse(&text, &root.join("kkm-bridge.toml")).unwrap());
    let store = Arc::new(Store::open(&root.join("state")).unwrap());
    Site {
        _tmp: tmp,
        root,
        config,
        store,
    }
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    let old = SystemTime::now() - Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(old)
        .unwrap();
}

async fn start(
    site: &Site,
    live: Option<Arc<Live>>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = AdminState {
        config: site.config.clone(),
        store: site.store.clone(),
        live,
    };
    tokio::spawn(kkm_bridge::status::serve_admin(
        listener,
        state,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

/// A raw HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(a);
        req.push_str(&format!("Authorization: Basic {b}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// Per till: (down queued, up queued, last down number) read from the journal.
fn journal_view(store: &Store) -> BTreeMap<u32, (u64, u64, Option<i64>)> {
    store
        .with_conn(|c| {
            let mut m: BTreeMap<u32, (u64, u64, Option<i64>)> = BTreeMap::new();
            let mut st = c.prepare(
                "SELECT pos, direction, state != 'delivered', COUNT(*) FROM package GROUP BY 1, 2, 3",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let e = m.entry(r.get(0)?).or_default();
                let (dir, queued, n): (String, bool, i64) = (r.get(1)?, r.get(2)?, r.get(3)?);
                if queued {
                    if dir == "down" {
                        e.0 = n as u64
                    } else {
                        e.1 = n as u64
                    }
                }
            }
            let mut st = c.prepare(
                "SELECT pos, COALESCE(sink_seq, source_seq) FROM package WHERE id IN
                 (SELECT MAX(id) FROM package WHERE state = 'delivered' AND direction = 'down'
                  GROUP BY pos)",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                m.entry(r.get(0)?).or_default().2 = r.get(1)?;
            }
            m.retain(|_, v| *v != (0, 0, None));
            Ok(m)
        })
        .unwrap()
}

/// Reads `data-*` attributes of every till row out of the page (or the browser's DOM).
fn page_view(html: &str) -> BTreeMap<u32, (u64, u64, Option<i64>)> {
    let attr = |row: &str, name: &str| -> String {
        let key = format!("{name}=\"");
        let i = row.find(&key).unwrap_or_else(|| panic!("{name} in {row}")) + key.len();
        row[i..].split('"').next().unwrap().to_string()
    };
    html.split("<tr ")
        .filter(|r| r.contains("data-pos="))
        .map(|r| {
            let pos = attr(r, "data-pos").parse().unwrap();
            let last = attr(r, "data-down-last");
            (
                pos,
                (
                    attr(r, "data-down-queued").parse().unwrap(),
                    attr(r, "data-up-queued").parse().unwrap(),
                    (!last.is_empty()).then(|| last.parse().unwrap()),
                ),
            )
        })
        .filter(|(_, v)| *v != (0, 0, None))
        .collect()
}

fn chromium(args: &[&str], url: &str, profile: &Path) -> Option<String> {
    let mut c = Command::new(CHROMIUM);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().ok()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(_st) = child.try_wait().unwrap() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Moves packages in a loop until told to stop: a new price list for tills 1-6 each round,
/// a report from till 11, one pass of the pump.
async fn keep_moving(site_root: PathBuf, pump: Arc<Pump>, stop: Arc<AtomicBool>) -> u32 {
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        for pos in 1..=6 {
            // Single-file mode: the till "consumes" its file before the next one comes.
            let _ = fs::remove_file(site_root.join(format!("shop1/POS{pos}.spr")));
            put(
                &site_root.join("office"),
                &format!("POS{pos}.spr.${round}"),
                format!("##@@&&\r\n#\r\nround {round}\r\n").as_bytes(),
            );
        }
        put(
            &site_root.join("shop1"),
            "POS11.rep",
            format!("1;01.01.26;10:00:00;1;11;{round};\r\n").as_bytes(),
        );
        pump.pass(false).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    round
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_in_a_real_browser_matches_the_journal() {
    let site = site("1-50", "");
    // Till 9 has not consumed its price list: the next two stay queued.
    put(
        &site.root.join("shop1"),
        "POS9.spr",
        b"##@@&&\r\n#\r\nold\r\n",
    );
    for n in 1..=2 {
        put(
            &site.root.join("office"),
            &format!("POS9.spr.${n}"),
            b"##@@&&\r\n#\r\nnew\r\n",
        );
    }
    let pump = Arc::new(Pump::new(site.config.clone(), site.store.clone()).unwrap());
    pump.pass(false).await;

    let live = Live::new();
    live.endpoint_ok("office");
    live.endpoint_error("shop1", "<script>alert('x')</script> disk full");
    live.till_contact("shop1", 3);
    live.till_error("shop1", 9, "POS9.spr not consumed <yet>");
    live.observe_request("shop1", Duration::from_millis(12));
    let (addr, stop_server) = start(&site, Some(live.clone())).await;
    let url = format!("http://{addr}/status?sort=pos");

    let stop = Arc::new(AtomicBool::new(false));
    let mover = tokio::spawn(keep_moving(site.root.clone(), pump.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // While packages flow: the page answers and is well-formed.
    let (code, body) = get(addr, "/status?sort=pos", None);
    assert_eq!(code, 200);
    assert!(body.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
    assert!(body.contains("shop&lt;1&gt;&amp;co"), "link name escaped");
    assert!(!body.contains("<script>"), "no markup from data");
    assert!(body.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; disk full"));

    if !Path::new(CHROMIUM).exists() {
        eprintln!("NOTE: {CHROMIUM} is missing; the browser part of this test is skipped (apt-get install chromium)");
        stop.store(true, Ordering::SeqCst);
        mover.await.unwrap();
        let _ = stop_server.send(());
        return;
    }
    let profile = tempfile::tempdir().unwrap();
    let shots = std::env::var_os("KKM_TEST_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile.path().to_path_buf());
    fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status.png");
    let (u, p, s) = (url.clone(), profile.path().join("p1"), png.clone());
    tokio::task::spawn_blocking(move || {
        chromium(
            &[
                &format!("--screenshot={}", s.display()),
                "--window-size=1280,900",
            ],
            &u,
            &p,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let shot = fs::read(&png).expect("chromium wrote the screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        shot.len() > 10_000,
        "the screenshot is not blank: {} bytes",
        shot.len()
    );

    // While still flowing: the browser's DOM has the rows.
    let (u, p) = (url.clone(), profile.path().join("p2"));
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &u, &p))
        .await
        .unwrap()
        .unwrap();
    assert!(dom.contains("id=\"tills\""), "{dom}");

    // Stop the flow; now the page in the browser must equal the journal, till by till.
    stop.store(true, Ordering::SeqCst);
    let rounds = mover.await.unwrap();
    assert!(
        rounds >= 2,
        "packages moved while the page was loaded ({rounds} rounds)"
    );
    let (u, p) = (url.clone(), profile.path().join("p3"));
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &u, &p))
        .await
        .unwrap()
        .unwrap();
    let journal = journal_view(&site.store);
    let page = page_view(&dom);
    assert_eq!(page, journal, "the page shows what the journal holds");
    assert_eq!(journal[&9].0, 2, "till 9 waits with two price lists");
    assert_eq!(
        journal[&1].2,
        Some(rounds as i64),
        "the last price list of till 1 (its number at the office)"
    );
    // The summary line agrees too.
    let queued: u64 = journal.values().map(|v| v.0 + v.1).sum();
    assert!(dom.contains(&format!("data-queued=\"{queued}\"")), "{dom}");
    assert!(dom.contains("POS9.spr not consumed &lt;yet&gt;"));
    let _ = stop_server.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_tills_page_sort_filter_auth_and_metrics() {
    std::env::set_var("KKM_TEST_STATUS_ADMIN_PW", "pw<1>");
    let site = site(
        "1-5000",
        "[admin]\nlisten = \"127.0.0.1:0\"\nlogin = \"it\"\npassword_env = \"KKM_TEST_STATUS_ADMIN_PW\"",
    );
    put(
        &site.root.join("shop1"),
        "POS4321.spr",
        b"##@@&&\r\n#\r\nold\r\n",
    );
    put(
        &site.root.join("office"),
        "POS4321.spr.$1",
        b"##@@&&\r\n#\r\nnew\r\n",
    );
    put(
        &site.root.join("office"),
        "POS17.spr.$1",
        b"##@@&&\r\n#\r\nnew\r\n",
    );
    let pump = Pump::new(site.config.clone(), site.store.clone()).unwrap();
    pump.pass(false).await;
    let (addr, stop) = start(&site, Some(Live::new())).await;
    let auth = Some("it:pw<1>");

    tokio::task::spawn_blocking(move || {
        assert_eq!(get(addr, "/status", None).0, 401);
        assert_eq!(get(addr, "/status", Some("it:wrong")).0, 401);
        assert_eq!(get(addr, "/metrics", None).0, 401);

        let t = Instant::now();
        let (code, body) = get(addr, "/status", auth);
        assert_eq!(code, 200);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(body.contains("page 1 of 25"), "200 rows per page");
        assert_eq!(body.matches("data-pos=").count(), 200);
        // Sorted by lag: the waiting till comes first.
        let first = body.split("data-pos=\"").nth(1).unwrap();
        assert!(first.starts_with("4321\""), "{}", &first[..40]);

        let (_, body) = get(addr, "/status?sort=pos&page=25", auth);
        assert!(body.contains("data-pos=\"5000\""));
        assert!(body.contains("page 25 of 25"));
        let (_, body) = get(addr, "/status?q=17", auth);
        assert_eq!(body.matches("data-pos=").count(), 1);
        assert!(body.contains("data-pos=\"17\" data-down-queued=\"0\""));
        let (_, body) = get(addr, "/status?q=4000-4009&sort=queue", auth);
        assert_eq!(body.matches("data-pos=").count(), 10);
        let (_, body) = get(addr, "/status?link=nosuch", auth);
        assert_eq!(body.matches("data-pos=").count(), 0);

        let (code, m) = get(addr, "/metrics", auth);
        assert_eq!(code, 200);
        assert!(m.contains("# TYPE kkm_bridge_queue_depth gauge"));
        assert!(m.contains(
            "kkm_bridge_queue_depth{link=\"shop<1>&co\",pos=\"4321\",direction=\"down\"} 1"
        ), "{}", &m[..2000]);
        assert!(m.contains("kkm_bridge_oldest_package_age_seconds{link=\"shop<1>&co\",pos=\"4321\",direction=\"down\"}"));
        assert!(m.contains(
            "kkm_bridge_journal_packages{link=\"shop<1>&co\",direction=\"down\",state=\"delivered\"} 1"
        ));
        assert!(m.contains("kkm_bridge_endpoint_errors_total{endpoint=\"shop1\"} 0"));
        let (code, j) = get(addr, "/status.json", auth);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["summary"]["tills"], 5000);
        assert_eq!(v["summary"]["queued"], 1);
    })
    .await
    .unwrap();
    let _ = stop.send(());
}
