//! Printing: human tables by default, JSON with `--json`.

use std::io::Write;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};

/// Where and how commands print their results.
///
/// All results go through here rather than `println!`, which panics when
/// stdout is closed (`bstack plan show x | head -3`); a failed write becomes
/// an error that `main` handles.
pub struct Output {
    /// Machine-readable JSON instead of tables.
    pub json: bool,
}

impl Output {
    /// Prints one line of results on stdout.
    pub fn line(&self, text: impl std::fmt::Display) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}")?;
        stdout.flush()
    }

    /// Prints a JSON value on one line (for `--json`).
    pub fn json_line(&self, value: &serde_json::Value) -> std::io::Result<()> {
        self.line(value)
    }
}

/// `1 page`, `2 pages`.
pub fn plural(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// A table with a header row; numeric columns (by index) are right-aligned.
pub fn table(header: &[&str], numeric: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    for &i in numeric {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// A two-column table of labels and values, without a header.
pub fn key_value_table() -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    t
}

/// Bytes in binary units: `512 B`, `4.0 KiB`, `1.50 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ if value < 10.0 => format!("{value:.2} {}", UNITS[unit]),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// Nanoseconds as a short duration: `850 ns`, `20.0 ms`, `6.00 s`.
pub fn duration_ns(ns: u64) -> String {
    let v = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", v / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", v / 1e6)
    } else {
        format!("{:.2} s", v / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4096), "4.00 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(duration_ns(20_000_000), "20.0 ms");
        assert_eq!(duration_ns(6_000_000_000), "6.00 s");
        assert_eq!(plural(1u64, "page"), "1 page");
        assert_eq!(plural(0u64, "page"), "0 pages");
    }
}
