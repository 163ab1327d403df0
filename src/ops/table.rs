//! Plain-text tables for `jobs list` and `printers` (pure: data and the time in, text out).

use protocol::api::{JobSummary, PrinterSummary};
use serde::Serialize;

use super::printable;

/// The wire name of a unit enum (`printing`, `timed_out`), `?` if it has none.
pub fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_owned(),
    }
}

/// How long ago `then_ms` was: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn age(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// A duration in seconds for people: `45s`, `11m`, `2h05m`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// A percentage with one decimal, or `-`.
pub fn percent(pct: Option<f64>) -> String {
    match pct {
        Some(p) if p.is_finite() => format!("{:.1}%", p.clamp(0.0, 100.0)),
        _ => "-".to_owned(),
    }
}

/// Columns separated by two spaces, each as wide as its widest cell; `right` columns are
/// right-aligned. No trailing spaces.
pub fn render(headers: &[&str], right: &[usize], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = w.saturating_sub(cell.chars().count());
            if right.contains(&i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The `jobs list` table.
pub fn jobs(jobs: &[JobSummary], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.to_string(),
                printable(&j.name, 40),
                wire_name(&j.state),
                j.printer_id
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
                percent(j.progress_pct),
                age(now_ms, j.submitted_at_ms),
            ]
        })
        .collect();
    render(
        &["JOB", "NAME", "STATE", "PRINTER", "PROGRESS", "SUBMITTED"],
        &[4],
        &rows,
    )
}

/// The `printers` table.
pub fn printers(printers: &[PrinterSummary]) -> String {
    let rows: Vec<Vec<String>> = printers
        .iter()
        .map(|p| {
            vec![
                p.printer_id.to_string(),
                if p.stale {
                    "stale".to_owned()
                } else {
                    wire_name(&p.presence)
                },
                wire_name(&p.phase),
                p.job_id
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
                percent(p.progress_pct),
                if !p.enrolled {
                    "unenrolled"
                } else if p.held {
                    "held"
                } else {
                    "-"
                }
                .to_owned(),
                p.consecutive_failures.to_string(),
            ]
        })
        .collect();
    render(
        &[
            "PRINTER", "PRESENCE", "PHASE", "JOB", "PROGRESS", "HELD", "FAILURES",
        ],
        &[4, 6],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::api::JobState;
    use protocol::presence::Presence;
    use protocol::state::PrinterPhase;
    use protocol::{JobId, PrinterId, Sha256Hex};

    #[test]
    fn jobs_table() {
        let job = |id: &str, state, printer: Option<&str>, pct| JobSummary {
            job_id: JobId::new(id).expect("id"),
            name: "cube20.gcode".into(),
            sha256: Sha256Hex::digest(b"x"),
            state,
            priority: 0,
            printer_id: printer.map(|p| PrinterId::new(p).expect("id")),
            progress_pct: pct,
            submitted_at_ms: 1_000_000,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
        };
        let text = jobs(
            &[
                job("j-000042", JobState::Printing, Some("p0"), Some(43.6)),
                job("j-000043", JobState::TimedOut, None, None),
            ],
            1_000_000 + 125_000,
        );
        assert_eq!(
            text,
            "JOB       NAME          STATE      PRINTER  PROGRESS  SUBMITTED\n\
             j-000042  cube20.gcode  printing   p0          43.6%  2m ago\n\
             j-000043  cube20.gcode  timed_out  -               -  2m ago\n"
        );
    }

    #[test]
    fn printers_table() {
        let p = PrinterSummary {
            printer_id: PrinterId::new("p0").expect("id"),
            presence: Presence::Online,
            stale: true,
            phase: PrinterPhase::Printing,
            job_id: Some(JobId::new("j-1").expect("id")),
            progress_pct: Some(100.0),
            held: true,
            consecutive_failures: 3,
            enrolled: true,
        };
        assert_eq!(
            printers(&[p]),
            "PRINTER  PRESENCE  PHASE     JOB  PROGRESS  HELD  FAILURES\n\
             p0       stale     printing  j-1    100.0%  held         3\n"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(age(10_000, 20_000), "0s ago");
        assert_eq!(age(7_200_000, 0), "2h ago");
        assert_eq!(age(3 * 86_400_000, 0), "3d ago");
        assert_eq!(duration(660), "11m");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(percent(Some(f64::NAN)), "-");
        assert_eq!(percent(Some(120.0)), "100.0%");
    }
}
