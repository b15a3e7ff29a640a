//! A back-office simulator: publishes KKMTransfer as «Торговое предприятие» would, with the
//! packages found in a folder, and writes the reports it receives into another folder.
//!
//! ```sh
//! mkdir -p var/bo-out var/bo-in
//! cp ../shared/fixtures/POS1.spr.utf8bom 'var/bo-out/POS1.spr.$1'
//! cargo run --example backoffice-sim -- --listen 127.0.0.1:8090 \
//!     --packages var/bo-out --reports var/bo-in --login kassa --password kassa
//! ```
//! Packages are read once at start: `POS{pos}.spr.$n` and `POS{pos}.flr.$n`, in numeric
//! order per till (an flr gets a UID). Reports are written as `POS{pos}.rep.{number}` (with
//! `.{UID}` appended when the till answered an flr).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kkm_bridge::package::{Kind, NamePattern};
use kkm_bridge::sim::BackOffice;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    #[arg(long, default_value = "/hs/KKMTransfer")]
    prefix: String,
    /// Folder with POS{pos}.spr.$n / POS{pos}.flr.$n to publish.
    #[arg(long)]
    packages: PathBuf,
    /// Folder to write received reports into.
    #[arg(long)]
    reports: PathBuf,
    #[arg(long)]
    login: Option<String>,
    #[arg(long)]
    password: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bo = BackOffice::new(a.login.clone().zip(a.password.clone()));
    let mut found = Vec::new();
    for e in std::fs::read_dir(&a.packages)? {
        let name = e?.file_name().to_string_lossy().to_string();
        for kind in [Kind::Spr, Kind::Flr] {
            let p = NamePattern::new(&format!("POS{{pos}}.{kind}")).expect("valid");
            if let Some(n) = p.parse(&name, true) {
                found.push((n.pos, n.n, kind, name.clone()));
            }
        }
    }
    found.sort();
    for (pos, _, kind, name) in &found {
        let bytes = std::fs::read(a.packages.join(name))?;
        let uid = (*kind == Kind::Flr).then(kkm_bridge::endpoint::new_uid);
        println!(
            "queued {name} for till {pos} ({kind}, {} bytes){}",
            bytes.len(),
            uid.as_ref()
                .map(|u| format!(", UID {u}"))
                .unwrap_or_default()
        );
        bo.queue(*pos, *kind, bytes, uid);
    }
    std::fs::create_dir_all(&a.reports)?;
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    println!(
        "back office: http://{}{}/{{POS}}/{{PackageNo}}",
        a.listen, a.prefix
    );
    let saver = {
        let bo = bo.clone();
        let dir = a.reports.clone();
        tokio::spawn(async move {
            let mut written = 0;
            loop {
                let reports = bo.reports();
                for r in &reports[written..] {
                    let mut name = format!("POS{}.rep.{}", r.pos, r.number);
                    if let Some(u) = &r.uid {
                        name.push('.');
                        name.push_str(u);
                    }
                    let _ = std::fs::write(dir.join(&name), &r.bytes);
                    println!("received report {name} ({} bytes)", r.bytes.len());
                }
                written = reports.len();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    bo.serve(listener, &a.prefix).await?;
    saver.abort();
    Ok(())
}
