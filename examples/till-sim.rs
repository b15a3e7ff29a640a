//! A till simulator: calls a KKMTransfer service (the bridge's, or a back office's) exactly
//! as «Кассир 5» does. It pulls every package by number (acknowledging each by asking for
//! the next), saves them into a folder, and posts report files.
//!
//! ```sh
//! cargo run --example till-sim -- --url http://127.0.0.1:8080/hs/KKMTransfer --pos 1 \
//!     --login kassa --password kassa --out var/till1 --report ../shared/fixtures/POS1.rep.cp1251
//! ```
//! The counters are kept in `{out}/.till-state` between runs; `--reset` starts again at 1
//! (as a reinstalled till would).

use std::path::PathBuf;

use clap::Parser;
use kkm_bridge::sim::Till;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    pos: u32,
    #[arg(long)]
    login: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// Where received packages are saved (POS{pos}.{kind}.{number}).
    #[arg(long)]
    out: PathBuf,
    /// Report files to post, in order.
    #[arg(long)]
    report: Vec<PathBuf>,
    /// UID to post the reports with (the answer to an flr).
    #[arg(long)]
    uid: Option<String>,
    /// Reset the package counter to 1.
    #[arg(long)]
    reset: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out)?;
    let state = a.out.join(".till-state");
    let mut till = Till::new(&a.url, a.pos, a.login.clone().zip(a.password.clone()));
    if let Ok(s) = std::fs::read_to_string(&state) {
        let mut it = s.split_whitespace().map(|x| x.parse::<i64>().unwrap_or(1));
        till.counter = it.next().unwrap_or(1);
        till.report_counter = it.next().unwrap_or(1);
    }
    if a.reset {
        till.reset_counter();
    }
    for r in till.pull_all().await? {
        let name = format!("POS{}.{}.{}", a.pos, r.kind, r.number);
        std::fs::write(a.out.join(&name), &r.bytes)?;
        println!(
            "received package {} ({}, {} bytes{})",
            r.number,
            r.kind,
            r.bytes.len(),
            r.uid.map(|u| format!(", UID {u}")).unwrap_or_default()
        );
    }
    for path in &a.report {
        let bytes = std::fs::read(path)?;
        let n = till.report_counter;
        let code = till.send_report(&bytes, a.uid.as_deref()).await?;
        println!("sent report {n} ({}): errcode {code}", path.display());
    }
    std::fs::write(
        &state,
        format!("{} {}\n", till.counter, till.report_counter),
    )?;
    println!(
        "next package number {}, next report number {}",
        till.counter, till.report_counter
    );
    Ok(())
}
