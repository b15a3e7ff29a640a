//! Exchange directory ↔ exchange directory through the real `kkm-bridge sync` binary, on a
//! real filesystem: bytes, order, single-file mode, files still being written, a second run,
//! and crashes at every commit point (abort at a crash point, and real SIGKILLs).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

#[path = "support/util.rs"]
mod util;
use util::fixture;

const BIN: &str = env!("CARGO_BIN_EXE_kkm-bridge");

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Site {
    /// A working folder with var/office and var/shop1 and a config; `kassa_extra` is added
    /// to the shop1 endpoint (e.g. `numbered = false`).
    fn new(office_extra: &str, kassa_extra: &str) -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::create_dir_all(root.join("var/office")).unwrap();
        fs::create_dir_all(root.join("var/shop1")).unwrap();
        fs::write(
            root.join("kkm-bridge.toml"),
            format!(
                r#"
state_dir = "var/state"
[endpoint.office]
type = "dir"
path = "var/office"
settle = "200ms"
{office_extra}
[endpoint.shop1]
type = "dir"
path = "var/shop1"
settle = "200ms"
{kassa_extra}
[[link]]
office = "office"
kassa = "shop1"
pos = "1-20"
"#
            ),
        )
        .unwrap();
        Site { _tmp: tmp, root }
    }

    fn office(&self) -> PathBuf {
        self.root.join("var/office")
    }
    fn shop(&self) -> PathBuf {
        self.root.join("var/shop1")
    }

    /// Writes a file and backdates it so it counts as complete.
    fn put(&self, dir: &Path, name: &str, bytes: &[u8]) {
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

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(&self.root).args(args).env("RUST_LOG", "warn");
        c
    }

    fn sync(&self) -> Output {
        self.cmd(&["sync"]).output().unwrap()
    }

    fn sync_ok(&self) {
        let o = self.sync();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// name → bytes of every regular file in a directory.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type().unwrap().is_file().then(|| {
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
        })
        .collect()
}

fn spr(pos: u32, n: u32) -> Vec<u8> {
    // A real-shaped spr: the fixture with a marker line, so every package differs.
    let mut b = fixture(if n.is_multiple_of(2) {
        "POS1.spr.cp1251"
    } else {
        "POS1.spr.utf8bom"
    });
    b.extend_from_slice(format!("till {pos} package {n}\r\n").as_bytes());
    b
}

/// Packages 1-3 of each of tills 1-3: (till, number, file name).
fn three_by_three() -> impl Iterator<Item = (u32, u32, String)> {
    (1..=3).flat_map(|pos| (1..=3).map(move |n| (pos, n, format!("POS{pos}.spr.${n}"))))
}

#[test]
fn spr_files_reach_the_kassa_folder_with_the_same_bytes_and_order() {
    let s = Site::new("", "");
    for (pos, n, name) in three_by_three() {
        s.put(&s.office(), &name, &spr(pos, n));
    }
    s.sync_ok();
    assert!(
        files(&s.office()).is_empty(),
        "sources are removed once taken"
    );
    let got = files(&s.shop());
    assert_eq!(got.len(), 9);
    for (pos, n, name) in three_by_three() {
        assert_eq!(got[&name], spr(pos, n), "till {pos} #{n}");
    }
}

/// A hidden file (a writer's temp, such as `.POS1.spr.$1.part`) is neither taken nor
/// warned about; an unknown visible name is left alone with a warning.
#[test]
fn hidden_files_are_writers_temps_left_alone_without_a_warning() {
    let s = Site::new("", "");
    s.put(&s.office(), ".POS1.spr.$1.part", b"half written");
    s.put(&s.office(), "notes.txt", b"not a package");
    s.put(&s.office(), "POS1.spr.$1", &spr(1, 1));
    let o = s.sync();
    assert!(o.status.success());
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(!log.contains(".POS1.spr.$1.part"), "{log}");
    assert!(log.contains("notes.txt"), "{log}");
    assert_eq!(files(&s.shop()).keys().collect::<Vec<_>>(), ["POS1.spr.$1"]);
    assert_eq!(
        files(&s.office()).keys().collect::<Vec<_>>(),
        [".POS1.spr.$1.part", "notes.txt"]
    );
}

#[test]
fn numbers_sort_numerically_and_continue_above_the_highest_present() {
    let s = Site::new("", "");
    for n in [1, 2, 9, 10] {
        s.put(&s.office(), &format!("POS1.spr.${n}"), &spr(1, n));
    }
    // The till has not consumed .$4 yet: new files go above it.
    s.put(&s.shop(), "POS1.spr.$4", b"unconsumed");
    s.sync_ok();
    let got = files(&s.shop());
    assert_eq!(got["POS1.spr.$4"], b"unconsumed");
    assert_eq!(got["POS1.spr.$5"], spr(1, 1));
    assert_eq!(got["POS1.spr.$6"], spr(1, 2));
    assert_eq!(got["POS1.spr.$7"], spr(1, 9));
    assert_eq!(got["POS1.spr.$8"], spr(1, 10));
}

#[test]
fn a_report_comes_back_to_the_office_with_the_same_bytes() {
    let s = Site::new("", "");
    s.put(&s.shop(), "POS2.rep.$1", &fixture("POS1.rep.cp1251"));
    s.put(&s.shop(), "POS2.rep.$2", &fixture("POS1.rep.utf8bom"));
    s.sync_ok();
    assert!(files(&s.shop()).is_empty());
    let got = files(&s.office());
    assert_eq!(got["POS2.rep.$1"], fixture("POS1.rep.cp1251"));
    assert_eq!(got["POS2.rep.$2"], fixture("POS1.rep.utf8bom"));
}

#[test]
fn single_file_mode_waits_for_the_till_to_consume() {
    let s = Site::new("", "numbered = false");
    s.put(&s.office(), "POS1.spr.$1", &spr(1, 1));
    s.put(&s.office(), "POS1.spr.$2", &spr(1, 2));
    let o = s.sync();
    assert_eq!(o.status.code(), Some(1), "the second package stays queued");
    assert!(String::from_utf8_lossy(&o.stderr).contains("stay queued"));
    assert_eq!(files(&s.shop())["POS1.spr"], spr(1, 1));
    // Still not consumed: nothing changes.
    assert_eq!(s.sync().status.code(), Some(1));
    assert_eq!(files(&s.shop())["POS1.spr"], spr(1, 1));
    // The till loads it and marks line 2 with '@': the next one may replace it.
    let mut loaded = spr(1, 1);
    let second_line = loaded.windows(2).position(|w| w == b"\n#").unwrap() + 1;
    loaded[second_line] = b'@';
    fs::write(s.shop().join("POS1.spr"), &loaded).unwrap();
    s.sync_ok();
    assert_eq!(files(&s.shop())["POS1.spr"], spr(1, 2));
    // A report in single-file mode is taken and numbered at the office.
    s.put(&s.shop(), "POS1.rep", &fixture("POS1.rep.cp1251"));
    s.sync_ok();
    assert_eq!(
        files(&s.office())["POS1.rep.$1"],
        fixture("POS1.rep.cp1251")
    );
    assert!(!s.shop().join("POS1.rep").exists());
}

#[test]
fn single_file_mode_writes_when_the_till_deleted_the_file() {
    let s = Site::new("", "numbered = false");
    s.put(&s.office(), "POS3.spr.$1", &spr(3, 1));
    s.put(&s.office(), "POS3.spr.$2", &spr(3, 2));
    assert_eq!(s.sync().status.code(), Some(1));
    fs::remove_file(s.shop().join("POS3.spr")).unwrap();
    s.sync_ok();
    assert_eq!(files(&s.shop())["POS3.spr"], spr(3, 2));
}

#[test]
fn a_file_still_being_written_is_not_taken() {
    let s = Site::new("", "");
    let path = s.office().join("POS1.spr.$1");
    // A writer that keeps the file fresh for longer than sync waits.
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = fs::File::create(&path).unwrap();
            for i in 0..40 {
                writeln!(f, "line {i}").unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let o = s.sync();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("still being written"));
    assert!(path.exists());
    assert!(files(&s.shop()).is_empty());
    writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.sync_ok();
    let got = files(&s.shop());
    assert_eq!(
        got["POS1.spr.$1"].len(),
        fs::metadata(s.shop().join("POS1.spr.$1")).unwrap().len() as usize
    );
    assert!(String::from_utf8_lossy(&got["POS1.spr.$1"]).ends_with("line 39\n"));
}

#[test]
fn a_fresh_lower_number_is_waited_for_and_order_is_kept() {
    let s = Site::new("", "");
    s.put(&s.office(), "POS1.spr.$2", &spr(1, 2));
    fs::write(s.office().join("POS1.spr.$1"), spr(1, 1)).unwrap(); // fresh: not settled
    s.put(&s.office(), "POS2.spr.$1", &spr(2, 1)); // another till is not held back
                                                   // sync waits out the settle time once, so by then .$1 is complete: both move in order.
    s.sync_ok();
    let got = files(&s.shop());
    assert_eq!(got["POS1.spr.$1"], spr(1, 1));
    assert_eq!(got["POS1.spr.$2"], spr(1, 2));
    assert_eq!(got["POS2.spr.$1"], spr(2, 1));
}

#[test]
fn a_second_sync_moves_nothing_twice() {
    let s = Site::new("", "");
    s.put(&s.office(), "POS1.spr.$1", &spr(1, 1));
    s.put(&s.shop(), "POS1.rep.$1", &fixture("POS1.rep.utf8bom"));
    s.sync_ok();
    let (shop, office) = (files(&s.shop()), files(&s.office()));
    s.sync_ok();
    s.sync_ok();
    assert_eq!(files(&s.shop()), shop);
    assert_eq!(files(&s.office()), office);
}

#[test]
fn foreign_tills_and_odd_names_are_left_alone() {
    let s = Site::new("", "");
    for name in [
        "POS99.spr.$1",
        "POS1.spr",
        "readme.txt",
        "POS01.spr.$1",
        "POS1.spr.$1.part",
    ] {
        s.put(&s.office(), name, b"x");
    }
    let o = s.sync();
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("till 99 is in no link"), "{err}");
    assert!(err.contains("readme.txt"), "{err}");
    assert_eq!(files(&s.office()).len(), 5, "nothing taken");
    assert!(files(&s.shop()).is_empty());
}

#[test]
fn archive_keeps_consumed_files() {
    let s = Site::new("archive = \"var/archive\"", "");
    s.put(&s.office(), "POS1.spr.$1", &spr(1, 1));
    s.sync_ok();
    let archived = files(&s.root.join("var/archive"));
    assert_eq!(archived.len(), 1);
    let (name, bytes) = archived.into_iter().next().unwrap();
    assert!(name.ends_with("POS1.spr.$1"), "{name}");
    assert_eq!(bytes, spr(1, 1));
}

#[test]
fn dry_run_prints_and_changes_nothing() {
    let s = Site::new("", "");
    s.put(&s.office(), "POS1.spr.$1", &spr(1, 1));
    let o = s.cmd(&["sync", "--dry-run"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("would take office/POS1.spr.$1"), "{out}");
    assert!(s.office().join("POS1.spr.$1").exists());
    assert!(files(&s.shop()).is_empty());
}

#[test]
fn a_bad_config_exits_78_naming_file_and_key() {
    let s = Site::new("numberd = true", "");
    let o = s.sync();
    assert_eq!(o.status.code(), Some(78));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("kkm-bridge.toml") && err.contains("numberd"),
        "{err}"
    );
    let o = s
        .cmd(&["sync", "--config", "missing.toml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78));
}

#[test]
fn a_second_process_on_the_same_state_dir_is_refused() {
    let s = Site::new("", "");
    s.sync_ok(); // creates the store
    let _held = kkm_bridge::store::Store::open(&s.root.join("var/state")).unwrap();
    let o = s.sync();
    assert_eq!(o.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another kkm-bridge process"));
}

/// Crash at every commit point, then run again: every package arrives exactly once, in
/// order. Three tills × three packages: one delivery batch spans the tills.
#[test]
fn a_crash_at_any_commit_point_loses_and_doubles_nothing() {
    for point in kkm_bridge::failpoint::POINTS {
        let s = Site::new("", "");
        for (pos, n, name) in three_by_three() {
            s.put(&s.office(), &name, &spr(pos, n));
        }
        s.put(&s.shop(), "POS1.rep.$1", &fixture("POS1.rep.cp1251"));
        let o = s
            .cmd(&["sync"])
            .env("KKM_BRIDGE_CRASH_AT", point)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&format!("crash point {point} reached")),
            "{point}: the crash point must be reached: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), None, "{point}: aborted, not exited");
        s.sync_ok();
        s.sync_ok();
        let shop = files(&s.shop());
        assert_eq!(shop.len(), 9, "{point}: {:?}", shop.keys());
        for (pos, n, name) in three_by_three() {
            assert_eq!(shop[&name], spr(pos, n), "{point} till {pos} #{n}");
        }
        let office = files(&s.office());
        assert_eq!(office.len(), 1, "{point}: {:?}", office.keys());
        assert_eq!(office["POS1.rep.$1"], fixture("POS1.rep.cp1251"));
    }
}

/// The same with packages too big for the journal: they are hard-linked into the spool
/// when taken and from the spool into the kassa folder when delivered (same filesystem),
/// so no bytes are copied; a crash at any point still loses and doubles nothing, and in
/// the end each delivered file is the only name of its bytes (the spool let go of it).
#[test]
fn a_crash_at_any_commit_point_with_big_linked_packages_loses_and_doubles_nothing() {
    use std::os::unix::fs::MetadataExt;
    let big = |n: u32| {
        let mut b = spr(1, n);
        for i in 0..20_000u32 {
            b.extend_from_slice(format!("{n};{i};Товар {i}\r\n").as_bytes());
        }
        b
    };
    for point in kkm_bridge::failpoint::POINTS {
        let s = Site::new("", "");
        for n in 1..=3 {
            s.put(&s.office(), &format!("POS1.spr.${n}"), &big(n));
        }
        let o = s
            .cmd(&["sync"])
            .env("KKM_BRIDGE_CRASH_AT", point)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), None, "{point}: aborted, not exited");
        s.sync_ok();
        s.sync_ok();
        let shop = files(&s.shop());
        assert_eq!(shop.len(), 3, "{point}: {:?}", shop.keys());
        for n in 1..=3 {
            let name = format!("POS1.spr.${n}");
            assert!(
                shop[&name].len() > 64 << 10,
                "big enough to live in a spool file"
            );
            assert_eq!(shop[&name], big(n), "{point} #{n}");
            let links = std::fs::metadata(s.shop().join(&name)).unwrap().nlink();
            assert_eq!(links, 1, "{point} #{n}: the spool still holds a name of it");
        }
        assert!(files(&s.office()).is_empty(), "{point}: every source taken");
    }
}

/// A crash while recovering from a crash (between resetting an interrupted delivery and
/// removing its temp file) still loses and doubles nothing.
#[test]
fn a_crash_during_recovery_loses_and_doubles_nothing() {
    for point in kkm_bridge::failpoint::RECOVERY_POINTS {
        let s = Site::new("", "");
        for n in 1..=2 {
            s.put(&s.office(), &format!("POS1.spr.${n}"), &spr(1, n));
        }
        let o = s
            .cmd(&["sync"])
            .env("KKM_BRIDGE_CRASH_AT", "after-delivering")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), None, "first crash");
        let o = s
            .cmd(&["sync"])
            .env("KKM_BRIDGE_CRASH_AT", point)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&format!("crash point {point} reached")),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        s.sync_ok();
        let shop = files(&s.shop());
        assert_eq!(shop.len(), 2, "{point}: {:?}", shop.keys());
        assert_eq!(shop["POS1.spr.$1"], spr(1, 1));
        assert_eq!(shop["POS1.spr.$2"], spr(1, 2));
    }
}

/// Real SIGKILLs at random moments while many packages move; then a clean run.
#[cfg(unix)]
#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let s = Site::new("", "");
    let tills = 10;
    let per = 8;
    for pos in 1..=tills {
        for n in 1..=per {
            let mut b = spr(pos, n);
            b.extend(std::iter::repeat_n(b'x', 20_000)); // bigger files widen the windows
            s.put(&s.office(), &format!("POS{pos}.spr.${n}"), &b);
        }
    }
    let mut kills = 0;
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..25 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 40);
        let mut child = s.cmd(&["sync"]).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    s.sync_ok();
    let shop = files(&s.shop());
    assert_eq!(shop.len() as u32, tills * per, "kills: {kills}");
    for pos in 1..=tills {
        for n in 1..=per {
            let mut b = spr(pos, n);
            b.extend(std::iter::repeat_n(b'x', 20_000));
            assert_eq!(shop[&format!("POS{pos}.spr.${n}")], b, "till {pos} #{n}");
        }
    }
    assert!(files(&s.office()).is_empty());
    assert!(kills > 0, "at least one run must have been killed");
    eprintln!(
        "sigkill soak: {} packages, {kills} kills, 0 lost, 0 doubled",
        tills * per
    );
}
