//! The history archive: ended jobs that left the store (retention, `machine::history`), one
//! JSON object per line in `<data_dir>/history/<YYYY-MM>.jsonl`, by the month the job ended
//! (UTC). Files are only ever appended to; each append is synced before the store forgets the
//! jobs, so a crash in between leaves a job in both (read archives by `job_id`, last wins),
//! never in neither. `printloop jobs export` and any JSON-lines tool read them.

use std::io::Write as _;
use std::path::Path;

use crate::model::JobRecord;

/// The archive's directory, under the data directory.
pub const HISTORY_DIR: &str = "history";

/// Appends `jobs` to their months' files under `dir` and syncs them.
pub fn append(dir: &Path, jobs: &[JobRecord]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut by_month: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    for j in jobs {
        let month = month_of(j.ended_at_ms.unwrap_or(j.submitted_at_ms));
        let line = by_month.entry(month).or_default();
        serde_json::to_writer(&mut *line, j).map_err(std::io::Error::other)?;
        line.push(b'\n');
    }
    for (month, lines) in by_month {
        let path = dir.join(format!("{month}.jsonl"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(&lines)?;
        f.sync_data()?;
    }
    Ok(())
}

/// Reads every archived job under `dir` (all months, oldest file first; a job archived twice
/// counts once, its last line). A line that does not parse is skipped and counted.
pub fn read(dir: &Path) -> std::io::Result<(Vec<JobRecord>, usize)> {
    let mut files: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    files.sort();
    let mut jobs: std::collections::BTreeMap<String, JobRecord> = Default::default();
    let mut bad = 0;
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<JobRecord>(line) {
                Ok(j) => {
                    jobs.insert(j.job_id.to_string(), j);
                }
                Err(_) => bad += 1,
            }
        }
    }
    Ok((jobs.into_values().collect(), bad))
}

/// `YYYY-MM` (UTC) of a Unix time in ms.
fn month_of(unix_ms: u64) -> String {
    let (year, month, _) = civil((unix_ms / 86_400_000) as i64);
    format!("{year:04}-{month:02}")
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
pub(crate) fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(951_782_400_000), "2000-02"); // 2000-02-29
        assert_eq!(month_of(1_798_761_599_999), "2026-12"); // 2026-12-31T23:59:59.999
        assert_eq!(month_of(1_798_761_600_000), "2027-01");
    }
}
