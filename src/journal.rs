//! Journal queries (`kkm-bridge journal`): what moved, with names, numbers, sizes and
//! sha256 — the answer to "did till 7 get yesterday's price list?".
//!
//! Times are unix milliseconds in the store and ISO-8601 UTC on the way out. Dates on the
//! way in are `YYYY-MM-DD` (UTC midnight) or RFC 3339 (`2026-01-01T10:00:00Z`,
//! `2026-01-01T13:00:00+03:00`); the conversion is the civil-calendar arithmetic below
//! rather than a date crate (two functions, tested against known dates).

use rusqlite::{params_from_iter, Connection};
use serde::Serialize;

use crate::package::Kind;

/// One journal row as `journal` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JournalRow {
    pub id: i64,
    pub taken_at: String,
    pub delivered_at: Option<String>,
    pub link: String,
    pub pos: u32,
    pub kind: String,
    pub direction: String,
    pub source_endpoint: String,
    pub source_name: String,
    pub source_seq: Option<i64>,
    pub sink_endpoint: String,
    pub sink_name: Option<String>,
    pub sink_seq: Option<i64>,
    pub size: u64,
    pub sha256: String,
    pub state: String,
    pub uid: Option<String>,
}

/// Filters of `kkm-bridge journal`. Times are unix ms; `since` inclusive, `until` exclusive.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub pos: Option<u32>,
    pub link: Option<String>,
    pub kind: Option<Kind>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: Option<u64>,
}

/// Rows matching `f`, oldest first (by the time they were taken).
pub fn query(conn: &Connection, f: &Filter) -> rusqlite::Result<Vec<JournalRow>> {
    let mut sql = String::from(
        "SELECT id, taken_at, delivered_at, link, pos, kind, direction, source_endpoint,
                source_name, source_seq, sink_endpoint, sink_name, sink_seq, size, sha256,
                state, uid
         FROM package WHERE 1 = 1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(p) = f.pos {
        sql.push_str(" AND pos = ?");
        args.push((p as i64).into());
    }
    if let Some(l) = &f.link {
        sql.push_str(" AND link = ?");
        args.push(l.clone().into());
    }
    if let Some(k) = f.kind {
        sql.push_str(" AND kind = ?");
        args.push(k.as_str().to_string().into());
    }
    // A package counts as "in the window" when it was taken or delivered in it.
    if let Some(s) = f.since {
        sql.push_str(" AND (taken_at >= ? OR delivered_at >= ?)");
        args.push(s.into());
        args.push(s.into());
    }
    if let Some(u) = f.until {
        sql.push_str(" AND taken_at < ?");
        args.push(u.into());
    }
    sql.push_str(" ORDER BY id");
    if let Some(n) = f.limit {
        sql.push_str(&format!(" LIMIT {n}"));
    }
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        Ok(JournalRow {
            id: r.get(0)?,
            taken_at: format_ms(r.get(1)?),
            delivered_at: r.get::<_, Option<i64>>(2)?.map(format_ms),
            link: r.get(3)?,
            pos: r.get(4)?,
            kind: r.get(5)?,
            direction: r.get(6)?,
            source_endpoint: r.get(7)?,
            source_name: r.get(8)?,
            source_seq: r.get(9)?,
            sink_endpoint: r.get(10)?,
            sink_name: r.get(11)?,
            sink_seq: r.get(12)?,
            size: r.get::<_, i64>(13)? as u64,
            sha256: r.get(14)?,
            state: r.get(15)?,
            uid: r.get(16)?,
        })
    })?;
    rows.collect()
}

/// The rows as an aligned text table for a terminal.
pub fn render_text(rows: &[JournalRow]) -> String {
    let mut t = crate::status::TextTable::new(&[
        "id",
        "taken (UTC)",
        "delivered (UTC)",
        "link",
        "till",
        "kind",
        "from",
        "to",
        "size",
        "sha256",
        "state",
        "uid",
    ]);
    for r in rows {
        let num = |n: Option<i64>| n.map(|n| format!(" #{n}")).unwrap_or_default();
        t.row(vec![
            r.id.to_string(),
            r.taken_at.clone(),
            r.delivered_at.clone().unwrap_or_else(|| "-".into()),
            r.link.clone(),
            r.pos.to_string(),
            r.kind.clone(),
            format!(
                "{}:{}{}",
                r.source_endpoint,
                r.source_name,
                num(r.source_seq)
            ),
            format!(
                "{}:{}{}",
                r.sink_endpoint,
                r.sink_name.as_deref().unwrap_or("-"),
                num(r.sink_seq)
            ),
            r.size.to_string(),
            r.sha256.clone(),
            r.state.clone(),
            r.uid.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

// ---------------------------------------------------------------------------------------
// Civil dates (proleptic Gregorian, UTC), after H. Hinnant's `days_from_civil`.
// ---------------------------------------------------------------------------------------

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Unix ms → `2026-01-01T10:00:00Z`.
pub fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Whether a `parse_time` input was a bare date (then `--until` means "through that day").
pub fn is_date_only(s: &str) -> bool {
    s.trim().len() == 10
}

/// `YYYY-MM-DD` (UTC midnight) or RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`, a space
/// instead of `T` allowed) → unix ms.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let bad =
        || format!("{s:?} is not a date; write 2026-01-01 or 2026-01-01T10:00:00Z (RFC 3339)");
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let t = s.get(r).ok_or_else(bad)?;
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse().map_err(|_| bad())
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)? as u32, num(8..10)? as u32);
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return Err(format!("{s:?}: no such date"));
    }
    let day_ms = days_from_civil(y, mo, d) * 86_400_000;
    if b.len() == 10 {
        return Ok(day_ms);
    }
    if !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') || b.len() < 20 {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || se > 60 {
        return Err(format!("{s:?}: no such time"));
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return Err(bad());
        }
        let mut ms = String::from(digits);
        ms.truncate(3);
        while ms.len() < 3 {
            ms.push('0');
        }
        frac_ms = ms.parse().map_err(|_| bad())?;
    }
    let offset_min = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.as_bytes()[3] == b':' =>
        {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
        _ => return Err(bad()),
    };
    Ok(day_ms + ((h * 60 + mi - offset_min) * 60 + se) * 1000 + frac_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_through_known_values() {
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        assert_eq!(parse_time("2026-01-01").unwrap(), 1_767_225_600_000);
        assert_eq!(format_ms(1_767_225_600_000), "2026-01-01T00:00:00Z");
        assert_eq!(
            parse_time("2026-01-01T13:00:00+03:00").unwrap(),
            parse_time("2026-01-01T10:00:00Z").unwrap()
        );
        assert_eq!(
            parse_time("2024-02-29T23:59:59.5Z").unwrap(),
            parse_time("2024-03-01").unwrap() - 500
        );
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        for days in [-1000i64, 0, 11_016, 20_454, 60_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn bad_dates_are_refused_with_an_example() {
        for s in [
            "2026-13-01",
            "2026-02-30",
            "yesterday",
            "2026-1-1",
            "2026-01-01T10:00",
        ] {
            assert!(parse_time(s).is_err(), "{s}");
        }
        assert!(parse_time("x").unwrap_err().contains("2026-01-01"));
        assert!(is_date_only("2026-01-01"));
    }
}
