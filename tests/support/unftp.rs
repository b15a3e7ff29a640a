//! An in-process libunftp server over a local directory, in its own runtime and thread so
//! that stopping it drops every session at once (as a server that went away does).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "util.rs"]
mod util;
#[allow(unused_imports)] // each test file uses only some of them
pub use util::{fixture, free_port};

pub struct Unftp {
    pub root: PathBuf,
    pub port: u16,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Unftp {
    /// Serves `root` on a free port (any user, any password).
    pub fn start(root: &Path) -> Unftp {
        Unftp::start_on(root, free_port())
    }

    pub fn start_on(root: &Path, port: u16) -> Unftp {
        std::fs::create_dir_all(root).unwrap();
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
                let server = libunftp::ServerBuilder::new(Box::new(move || {
                    unftp_sbe_fs::Filesystem::new(r.clone()).unwrap()
                }))
                .greeting("kkm-bridge test server")
                .passive_ports(50000..=65000)
                .build()
                .unwrap();
                server.listen(format!("127.0.0.1:{port}")).await.unwrap();
            });
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
        Unftp {
            root: root.to_path_buf(),
            port,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// The URL of a directory under the root, for the bridge's config.
    pub fn url(&self, dir: &str) -> String {
        format!("ftp://kassa:any@127.0.0.1:{}/{dir}", self.port)
    }

    /// Stops the server: the port closes, every session is dropped.
    pub fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// Starts it again on the same port over the same root.
    pub fn restart(&mut self) {
        self.kill();
        *self = Unftp::start_on(&self.root.clone(), self.port);
    }
}

impl Drop for Unftp {
    fn drop(&mut self) {
        self.kill();
    }
}
