//! The FTP servers the FTP tests talk to (libunftp in process, with TLS and injected faults;
//! vsftpd from `KKM_TEST_FTP_URL`), a plain FTP client view of them, and a small in-process
//! bridge. Shared by tests/ftp.rs and tests/ftp_faults.rs.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kkm_bridge::config::Config;
use kkm_bridge::endpoint::ftp::parse_list_line;
use kkm_bridge::pump::{PassReport, Pump};
use kkm_bridge::store::Store;
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "util.rs"]
mod util;
#[allow(unused_imports)] // each test file uses only some of them
pub use util::{fixture, free_port, noise};

// ------------------------------------------------------------------ servers

/// An FTP server the scenarios talk to: its URL for the bridge, and a plain client.
pub struct Server {
    /// With the password (for the test client and the bridge config).
    pub url: String,
    pub kind: ServerKind,
}

pub enum ServerKind {
    Unftp(InProc),
    Vsftpd,
}

/// libunftp on a fixed port, in its own runtime so that "killing" it drops every session.
pub struct InProc {
    pub root: PathBuf,
    pub port: u16,
    pub stop: Option<std::sync::mpsc::Sender<()>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl InProc {
    pub fn start(root: &Path, port: u16) -> InProc {
        InProc::start_with(root, port, Arc::new(Faults::default()))
    }

    pub fn start_with(root: &Path, port: u16, faults: Arc<Faults>) -> InProc {
        InProc::start_full(root, port, faults, None)
    }

    /// `tls`: (certificate, key) PEM files: FTPS required on control and data connections.
    pub fn start_full(
        root: &Path,
        port: u16,
        faults: Arc<Faults>,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> InProc {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let r = root.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn(async move {
                let mut builder = libunftp::ServerBuilder::new(Box::new(move || FaultyFs {
                    inner: unftp_sbe_fs::Filesystem::new(r.clone()).unwrap(),
                    faults: faults.clone(),
                }))
                .greeting("kkm-bridge test server")
                .passive_ports(50000..=65000);
                if let Some((cert, key)) = tls {
                    builder = builder.ftps(cert, key).ftps_required(true, true);
                }
                let server = builder.build().unwrap();
                server.listen(format!("127.0.0.1:{port}")).await.unwrap();
            });
            // Wait until the port answers.
            rt.block_on(async {
                for _ in 0..200 {
                    if tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            ready_tx.send(()).unwrap();
            let _ = rx.recv();
            rt.shutdown_background();
        });
        ready_rx.recv().unwrap();
        InProc {
            root: root.to_path_buf(),
            port,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Server {
    pub fn unftp(root: &Path) -> Server {
        Server::unftp_with(root, Arc::new(Faults::default()))
    }

    pub fn unftp_with(root: &Path, faults: Arc<Faults>) -> Server {
        std::fs::create_dir_all(root.join("Files")).unwrap();
        let port = free_port();
        Server {
            url: format!("ftp://kassa:any@127.0.0.1:{port}/Files"),
            kind: ServerKind::Unftp(InProc::start_with(root, port, faults)),
        }
    }

    /// libunftp over a temp root of its own, with [`Faults`] for the test to set (keep the
    /// root alive as long as the server).
    pub fn unftp_faulty() -> (tempfile::TempDir, Arc<Faults>, Server) {
        let root = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let server = Server::unftp_with(root.path(), faults.clone());
        (root, faults, server)
    }

    /// vsftpd from `KKM_TEST_FTP_URL`, or None (the test prints a note and passes).
    pub fn vsftpd() -> Option<Server> {
        match std::env::var("KKM_TEST_FTP_URL") {
            Ok(url) if !url.is_empty() => Some(Server {
                url,
                kind: ServerKind::Vsftpd,
            }),
            _ => {
                eprintln!("note: KKM_TEST_FTP_URL is not set; vsftpd scenario skipped");
                None
            }
        }
    }

    pub async fn kill(&mut self) {
        match &mut self.kind {
            ServerKind::Unftp(s) => s.kill(),
            ServerKind::Vsftpd => script("stop"),
        }
    }

    pub async fn start_again(&mut self) {
        match &mut self.kind {
            ServerKind::Unftp(s) => {
                let (root, port) = (s.root.clone(), s.port);
                *s = InProc::start(&root, port);
            }
            ServerKind::Vsftpd => script("start"),
        }
    }

    pub async fn client(&self) -> AsyncFtpStream {
        let rest = self.url.strip_prefix("ftp://").unwrap();
        let (auth, rest) = rest.split_once('@').unwrap();
        let (user, pass) = auth.split_once(':').unwrap();
        let (hostport, dir) = rest.split_once('/').unwrap();
        let mut f = AsyncFtpStream::connect(hostport).await.unwrap();
        f.login(user, pass).await.unwrap();
        f.transfer_type(FileType::Binary).await.unwrap();
        f.cwd(dir).await.unwrap();
        f
    }

    pub async fn put(&self, name: &str, bytes: &[u8]) {
        let mut f = self.client().await;
        let mut w = f.put_with_stream(name).await.unwrap();
        w.write_all(bytes).await.unwrap();
        w.finish().await.unwrap();
        let _ = f.quit().await;
    }

    pub async fn get(&self, name: &str) -> Vec<u8> {
        let mut f = self.client().await;
        let mut r = f.retr_as_stream(name).await.unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        r.finish().await.unwrap();
        let _ = f.quit().await;
        out
    }

    /// Several files over one session.
    pub async fn get_many(&self, names: &[String]) -> Vec<Vec<u8>> {
        let mut f = self.client().await;
        let mut all = Vec::new();
        for name in names {
            let mut r = f.retr_as_stream(name).await.unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.unwrap();
            r.finish().await.unwrap();
            all.push(out);
        }
        let _ = f.quit().await;
        all
    }

    /// Every file name in the directory, dot files included, sorted.
    pub async fn names(&self) -> Vec<String> {
        let mut f = self.client().await;
        let lines = f.list(Some("-a")).await.unwrap();
        let _ = f.quit().await;
        let mut v: Vec<String> = lines
            .iter()
            .filter_map(|l| parse_list_line(l))
            .filter(|e| e.is_file)
            .map(|e| e.name)
            .collect();
        v.sort();
        v
    }

    pub async fn clear(&self) {
        let names = self.names().await;
        let mut f = self.client().await;
        for n in names {
            f.rm(&n).await.unwrap();
        }
        let _ = f.quit().await;
    }
}

pub fn script(cmd: &str) {
    let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ftp-server");
    let out = std::process::Command::new(s).arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/ftp-server {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// vsftpd scenarios share one server directory: one at a time.
pub static VSFTPD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------ fault injection

/// Faults the in-process server injects, each for the next N operations.
#[derive(Debug, Default)]
pub struct Faults {
    /// RNTO answers 553.
    pub refuse_renames: std::sync::atomic::AtomicU32,
    /// RNTO to one of these names answers 553, once per name.
    pub refuse_renames_to: std::sync::Mutex<Vec<String>>,
    /// RETR sends half the file, then the data connection breaks.
    pub cut_downloads: std::sync::atomic::AtomicU32,
    /// LIST takes `slow_list_ms` before answering.
    pub slow_lists: std::sync::atomic::AtomicU32,
    pub slow_list_ms: std::sync::atomic::AtomicU64,
    /// STOR answers 452 (insufficient storage space), then 552 (exceeded allocation).
    pub full_452: std::sync::atomic::AtomicU32,
    pub full_552: std::sync::atomic::AtomicU32,
    /// STOR receives half the file, then the data connection breaks.
    pub cut_uploads: std::sync::atomic::AtomicU32,
    /// STOR answers 226 but the file keeps all but the last 100 bytes.
    pub short_uploads: std::sync::atomic::AtomicU32,
}

pub fn take_fault(n: &std::sync::atomic::AtomicU32) -> bool {
    n.fetch_update(
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
        |v| v.checked_sub(1),
    )
    .is_ok()
}

/// The filesystem back-end of libunftp with [`Faults`].
#[derive(Debug)]
pub struct FaultyFs {
    pub inner: unftp_sbe_fs::Filesystem,
    pub faults: Arc<Faults>,
}

/// Yields `left` bytes of the file, then fails like a dropped connection.
pub struct CutReader {
    pub inner: Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>,
    pub left: usize,
}

impl tokio::io::AsyncRead for CutReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected: connection dropped mid-transfer",
            )));
        }
        let left = self.left;
        let mut small =
            tokio::io::ReadBuf::new(buf.initialize_unfilled_to(left.min(buf.remaining())));
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut small);
        let n = small.filled().len();
        buf.advance(n);
        self.left -= n;
        r
    }
}

#[async_trait::async_trait]
impl<U: unftp_core::auth::UserDetail> unftp_core::storage::StorageBackend<U> for FaultyFs {
    type Metadata = unftp_sbe_fs::Meta;

    fn supported_features(&self) -> u32 {
        unftp_core::storage::StorageBackend::<U>::supported_features(&self.inner)
    }
    async fn metadata<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
    ) -> unftp_core::storage::Result<Self::Metadata> {
        self.inner.metadata(user, path).await
    }
    async fn list<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
    ) -> unftp_core::storage::Result<Vec<unftp_core::storage::Fileinfo<PathBuf, Self::Metadata>>>
    {
        if take_fault(&self.faults.slow_lists) {
            let ms = self
                .faults
                .slow_list_ms
                .load(std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.inner.list(user, path).await
    }
    async fn get<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
        start_pos: u64,
    ) -> unftp_core::storage::Result<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>> {
        let size = self
            .inner
            .metadata(user, path.as_ref())
            .await
            .map(|m| unftp_core::storage::Metadata::len(&m));
        let r = self.inner.get(user, path, start_pos).await?;
        if take_fault(&self.faults.cut_downloads) {
            let left = (size.unwrap_or(2) / 2) as usize;
            return Ok(Box::new(CutReader { inner: r, left }));
        }
        Ok(r)
    }
    async fn put<
        P: AsRef<Path> + Send + std::fmt::Debug,
        R: tokio::io::AsyncRead + Send + Sync + Unpin + 'static,
    >(
        &self,
        user: &U,
        input: R,
        path: P,
        start_pos: u64,
    ) -> unftp_core::storage::Result<u64> {
        use unftp_core::storage::ErrorKind;
        if take_fault(&self.faults.full_452) {
            return Err(ErrorKind::InsufficientStorageSpaceError.into());
        }
        if take_fault(&self.faults.full_552) {
            return Err(ErrorKind::ExceededStorageAllocationError.into());
        }
        if take_fault(&self.faults.cut_uploads) {
            // Half of what the client sends reaches the file, then the transfer breaks.
            let cut = CutReader {
                inner: Box::new(input),
                left: 300,
            };
            let _ = self.inner.put(user, cut, path, start_pos).await;
            return Err(ErrorKind::ConnectionClosed.into());
        }
        if take_fault(&self.faults.short_uploads) {
            let mut input = input;
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut input, &mut all)
                .await
                .map_err(|_| ErrorKind::ConnectionClosed)?;
            all.truncate(all.len().saturating_sub(100));
            let n = all.len() as u64;
            self.inner
                .put(user, std::io::Cursor::new(all), path, start_pos)
                .await?;
            return Ok(n);
        }
        self.inner.put(user, input, path, start_pos).await
    }
    async fn del<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
    ) -> unftp_core::storage::Result<()> {
        self.inner.del(user, path).await
    }
    async fn mkd<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
    ) -> unftp_core::storage::Result<()> {
        self.inner.mkd(user, path).await
    }
    async fn rename<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        from: P,
        to: P,
    ) -> unftp_core::storage::Result<()> {
        let named = {
            let mut names = self.faults.refuse_renames_to.lock().unwrap();
            let to = to
                .as_ref()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            match names.iter().position(|n| Some(n) == to.as_ref()) {
                Some(i) => {
                    names.remove(i);
                    true
                }
                None => false,
            }
        };
        if named || take_fault(&self.faults.refuse_renames) {
            return Err(unftp_core::storage::ErrorKind::FileNameNotAllowedError.into());
        }
        self.inner.rename(user, from, to).await
    }
    async fn rmd<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
    ) -> unftp_core::storage::Result<()> {
        self.inner.rmd(user, path).await
    }
    async fn cwd<P: AsRef<Path> + Send + std::fmt::Debug>(
        &self,
        user: &U,
        path: P,
    ) -> unftp_core::storage::Result<()> {
        self.inner.cwd(user, path).await
    }
}

// ------------------------------------------------------------------ the bridge

pub struct Bridge {
    pub pump: Pump,
    pub _state: tempfile::TempDir,
}

pub fn bridge(toml: &str) -> Bridge {
    let state = tempfile::tempdir().unwrap();
    let text = format!("state_dir = {:?}\n{toml}", state.path().join("state"));
    let config = Arc::new(Config::parse(&text, Path::new("test.toml")).unwrap());
    let store = Arc::new(Store::open(&config.state_dir).unwrap());
    Bridge {
        pump: Pump::new(config, store).unwrap(),
        _state: state,
    }
}

impl Bridge {
    pub async fn pass(&self) -> PassReport {
        self.pump.pass(false).await
    }

    /// Passes until nothing is left to move (or `max` passes).
    pub async fn settle(&self, max: usize) -> PassReport {
        let mut total = PassReport::default();
        for _ in 0..max {
            let r = self.pass().await;
            total.taken += r.taken;
            total.delivered += r.delivered;
            let done = r.all_moved();
            total.waiting = r.waiting;
            total.queued = r.queued;
            total.errors = r.errors;
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        total
    }
}

/// A bridge from the office folder `office` to the FTP directory `url` (endpoint
/// `shopftp`, with `extra` keys) for tills `pos`.
pub fn dir_to_ftp(office: &Path, url: &str, extra: &str, pos: &str) -> Bridge {
    bridge(&format!(
        "{}{}{}",
        dir_endpoint("office", office, ""),
        ftp_endpoint("shopftp", url, extra),
        link("office", "shopftp", pos)
    ))
}

/// A bridge from the office FTP directory `url` to the tills' folder `shop` for tills
/// `pos`.
pub fn ftp_to_dir(url: &str, shop: &Path, pos: &str) -> Bridge {
    bridge(&format!(
        "{}{}{}",
        ftp_endpoint("office", url, ""),
        dir_endpoint("shop", shop, ""),
        link("office", "shop", pos)
    ))
}

pub fn ftp_endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[endpoint.{name}]\ntype = \"ftp\"\nurl = {url:?}\npoll = \"100ms\"\ntimeout = \"5s\"\n{extra}\n"
    )
}

pub fn dir_endpoint(name: &str, path: &Path, extra: &str) -> String {
    format!(
        "[endpoint.{name}]\ntype = \"dir\"\npath = {:?}\nsettle = \"0s\"\n{extra}\n",
        path
    )
}

pub fn link(office: &str, kassa: &str, pos: &str) -> String {
    format!("[[link]]\noffice = {office:?}\nkassa = {kassa:?}\npos = {pos:?}\n")
}

pub fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

pub type Scenario = for<'a> fn(&'a mut Server) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

pub async fn on_unftp(s: Scenario) {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::unftp(root.path());
    s(&mut server).await;
}

pub async fn on_vsftpd(s: Scenario) {
    let Some(mut server) = Server::vsftpd() else {
        return;
    };
    let _one_at_a_time = VSFTPD.lock().await;
    server.clear().await;
    s(&mut server).await;
    server.clear().await;
}

// ------------------------------------------------------------------ a control-port proxy

/// A TCP proxy in front of an FTP server's control port (data connections go to the
/// server directly: its PASV replies name itself). It counts the sessions open at once,
/// logs every command with its session, and can drop the session that sends a given
/// command, like a server or a network that ends one session mid-way.
pub struct Proxy {
    pub port: u16,
    pub state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct ProxyState {
    pub open: std::sync::atomic::AtomicUsize,
    pub max_open: std::sync::atomic::AtomicUsize,
    /// (session, command line), in the order the proxy saw them.
    pub commands: std::sync::Mutex<Vec<(usize, String)>>,
    /// RNFR lines that arrived with their RNTO already behind them (one write: pipelined).
    pub rnfr_with_rnto: std::sync::atomic::AtomicUsize,
    /// RNTO lines with a further RNFR already behind them (several renames in one write).
    pub rnto_with_rnfr: std::sync::atomic::AtomicUsize,
    /// An RNTO to one of these names is sent on as a rename into a missing directory, so
    /// the server itself refuses it, in order with its other replies (once per name).
    pub refuse_rnto: std::sync::Mutex<Vec<String>>,
    /// Drop the session that sends the `drop_nth`-th command starting with `drop_prefix`
    /// (1-based; 0 = never); with `drop_after_forward`, the command reaches the server
    /// first and only its reply is lost.
    pub drop_prefix: std::sync::Mutex<String>,
    pub drop_nth: std::sync::atomic::AtomicUsize,
    pub drop_after_forward: std::sync::atomic::AtomicBool,
    pub seen: std::sync::atomic::AtomicUsize,
    pub dropped: std::sync::atomic::AtomicUsize,
    /// Sessions allowed at once (0 = any number): one more is greeted with `421` and
    /// closed, as servers with a per-user limit do.
    pub max_sessions: std::sync::atomic::AtomicUsize,
    pub refused: std::sync::atomic::AtomicUsize,
    /// A command starting with the prefix is held until the check says true (or 3 s
    /// passed), then sent on; `held_ok` / `held_timeout` count how each hold ended.
    pub hold: std::sync::Mutex<Option<(String, Hold)>>,
    pub held_ok: std::sync::atomic::AtomicUsize,
    pub held_timeout: std::sync::atomic::AtomicUsize,
}

pub type Hold = Arc<dyn Fn() -> bool + Send + Sync>;

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut next_id = 0usize;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                next_id += 1;
                let id = next_id;
                let st = st.clone();
                tokio::spawn(async move {
                    let limit = st.max_sessions.load(SeqCst);
                    if limit > 0 && st.open.load(SeqCst) >= limit {
                        st.refused.fetch_add(1, SeqCst);
                        let mut client = client;
                        let _ = client
                            .write_all(
                                b"421 There are too many connected users, please try later.\r\n",
                            )
                            .await;
                        return;
                    }
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let now = st.open.fetch_add(1, SeqCst) + 1;
                    st.max_open.fetch_max(now, SeqCst);
                    let (cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let s2c = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut lines = tokio::io::BufReader::new(cr);
                    loop {
                        let mut line = Vec::new();
                        match tokio::io::AsyncBufReadExt::read_until(&mut lines, b'\n', &mut line)
                            .await
                        {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        let text = String::from_utf8_lossy(&line).trim_end().to_string();
                        if text.starts_with("RNFR ") && lines.buffer().starts_with(b"RNTO ") {
                            st.rnfr_with_rnto.fetch_add(1, SeqCst);
                        }
                        if text.starts_with("RNTO ") && lines.buffer().starts_with(b"RNFR ") {
                            st.rnto_with_rnfr.fetch_add(1, SeqCst);
                        }
                        if let Some(to) = text.strip_prefix("RNTO ") {
                            let mut refuse = st.refuse_rnto.lock().unwrap();
                            if let Some(i) = refuse.iter().position(|n| n == to) {
                                refuse.remove(i);
                                line = format!("RNTO /kkm-no-such-dir/{to}\r\n").into_bytes();
                            }
                        }
                        st.commands.lock().unwrap().push((id, text.clone()));
                        let hold = st.hold.lock().unwrap().clone();
                        if let Some((_, ready)) = hold.filter(|(p, _)| text.starts_with(p)) {
                            let until = std::time::Instant::now() + Duration::from_secs(3);
                            while !ready() && std::time::Instant::now() < until {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            let counter = if ready() {
                                &st.held_ok
                            } else {
                                &st.held_timeout
                            };
                            counter.fetch_add(1, SeqCst);
                        }
                        let prefix = st.drop_prefix.lock().unwrap().clone();
                        let nth = st.drop_nth.load(SeqCst);
                        if nth > 0
                            && !prefix.is_empty()
                            && text.starts_with(&prefix)
                            && st.seen.fetch_add(1, SeqCst) + 1 == nth
                        {
                            s2c.abort();
                            if st.drop_after_forward.load(SeqCst) {
                                let _ = sw.write_all(&line).await;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            st.dropped.fetch_add(1, SeqCst);
                            break;
                        }
                        if sw.write_all(&line).await.is_err() {
                            break;
                        }
                    }
                    s2c.abort();
                    st.open.fetch_sub(1, SeqCst);
                });
            }
        });
        Proxy { port, state, task }
    }

    /// The server's URL with the proxy's port.
    pub fn url(&self, server_url: &str) -> String {
        let (head, rest) = server_url.rsplit_once('@').unwrap();
        let (_, path) = rest.split_once('/').unwrap();
        format!("{head}@127.0.0.1:{}/{path}", self.port)
    }

    /// Drops the session that sends the `nth` command starting with `prefix`.
    pub fn drop_session_at(&self, prefix: &str, nth: usize, after_forward: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        *self.state.drop_prefix.lock().unwrap() = prefix.to_string();
        self.state.drop_after_forward.store(after_forward, SeqCst);
        self.state.seen.store(0, SeqCst);
        self.state.drop_nth.store(nth, SeqCst);
    }

    /// The targets of every RNTO, in the order they were sent.
    pub fn renames(&self) -> Vec<String> {
        self.state
            .commands
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, c)| c.strip_prefix("RNTO ").map(str::to_string))
            .collect()
    }
}

/// The control port of a server URL.
pub fn url_port(url: &str) -> u16 {
    let rest = url.rsplit_once('@').unwrap().1;
    let hostport = rest.split_once('/').unwrap().0;
    hostport.rsplit_once(':').unwrap().1.parse().unwrap()
}
