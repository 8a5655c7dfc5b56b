//! Host memory of one process, from `/proc/<pid>/smaps_rollup`.

use anyhow::Context as _;
use serde::Serialize;

/// The figures of `smaps_rollup` the report uses, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Rollup {
    /// Resident set.
    pub rss_kib: u64,
    /// Proportional set: shared pages divided among their mappers.
    pub pss_kib: u64,
    /// PSS of anonymous pages (QEMU's heap, and guest pages written since the restore:
    /// a private file mapping's copy-on-write copies are anonymous).
    pub pss_anon_kib: u64,
    /// PSS of file pages (the template's memory file read through the page cache, the
    /// QEMU binary and libraries).
    pub pss_file_kib: u64,
    /// PSS of shared memory.
    pub pss_shmem_kib: u64,
}

/// Parses the text of a `smaps_rollup`.
pub fn parse(text: &str) -> Rollup {
    let mut r = Rollup::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = val.parse::<u64>() else { continue };
        match key {
            "Rss:" => r.rss_kib = v,
            "Pss:" => r.pss_kib = v,
            "Pss_Anon:" => r.pss_anon_kib = v,
            "Pss_File:" => r.pss_file_kib = v,
            "Pss_Shmem:" => r.pss_shmem_kib = v,
            _ => {}
        }
    }
    r
}

/// Reads `/proc/<pid>/smaps_rollup`.
pub fn rollup(pid: u32) -> anyhow::Result<Rollup> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_rollup() {
        let text = "55a0-7ffd ---p 00000000 00:00 0  [rollup]\n\
                    Rss:              204800 kB\n\
                    Pss:              150000 kB\n\
                    Pss_Dirty:         90000 kB\n\
                    Pss_Anon:          80000 kB\n\
                    Pss_File:          70000 kB\n\
                    Pss_Shmem:             0 kB\n";
        let r = super::parse(text);
        assert_eq!(
            (
                r.rss_kib,
                r.pss_kib,
                r.pss_anon_kib,
                r.pss_file_kib,
                r.pss_shmem_kib
            ),
            (204800, 150000, 80000, 70000, 0)
        );
    }
}
