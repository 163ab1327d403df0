//! Big, valid G-code for benchmarks: the shared slicer output (`../shared/data/gcode/`)
//! repeated to a size, each copy under its own comment line, so files made with different
//! labels differ and a whole-file check still counts real lines.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The sample every generated file repeats.
pub fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/gcode/cylinder30.gcode")
}

/// Writes a file of at least `size` bytes to `path`; `label` goes into every copy's comment.
pub fn write_repeated(path: &Path, size: u64, label: &str) -> std::io::Result<()> {
    let sample = sample_path();
    let body = std::fs::read(&sample).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (../shared must sit beside the repo)",
                sample.display()
            ),
        )
    })?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let (mut written, mut copy) = (0u64, 0u64);
    while written < size {
        let head = format!("; printloop {label} copy {copy}\n");
        out.write_all(head.as_bytes())?;
        out.write_all(&body)?;
        written += (head.len() + body.len()) as u64;
        copy += 1;
    }
    out.flush()
}
