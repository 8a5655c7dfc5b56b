//! The table: one row per figure, each with its ratio to a floor or peer measured in the
//! same run, and the issue-8 targets checked against those ratios.

use serde::Serialize;

use crate::stats::{round2, Stats};

/// How a row's values read.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Milliseconds.
    Ms,
    /// Mebibytes.
    Mib,
}

/// How a row's ratio reads.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RatioKind {
    /// `2.50x`.
    Times,
    /// `3.1 %`.
    Percent,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Table section.
    pub section: String,
    /// What was measured.
    pub measure: String,
    /// Samples (`None`: a single derived figure).
    pub n: Option<usize>,
    /// Median (or the single value).
    pub p50: f64,
    /// 99th percentile (`None`: not a distribution).
    pub p99: Option<f64>,
    /// Unit of `p50` / `p99`.
    pub unit: Unit,
    /// `p50` over the reference's `p50`.
    pub ratio: Option<f64>,
    /// How `ratio` reads.
    pub ratio_kind: RatioKind,
    /// What the ratio is relative to.
    pub reference: String,
}

impl Row {
    /// A row from a distribution.
    pub fn stats(section: &str, measure: &str, s: &Stats) -> Self {
        Self {
            section: section.into(),
            measure: measure.into(),
            n: Some(s.n),
            p50: s.p50_ms,
            p99: Some(s.p99_ms),
            unit: Unit::Ms,
            ratio: None,
            ratio_kind: RatioKind::Times,
            reference: String::new(),
        }
    }

    /// A row with one value.
    pub fn value(section: &str, measure: &str, n: Option<usize>, v: f64, unit: Unit) -> Self {
        Self {
            section: section.into(),
            measure: measure.into(),
            n,
            p50: round2(v),
            p99: None,
            unit,
            ratio: None,
            ratio_kind: RatioKind::Times,
            reference: String::new(),
        }
    }

    /// Sets the ratio and what it is relative to.
    pub fn vs(mut self, ratio: f64, reference: &str) -> Self {
        self.ratio = ratio.is_finite().then(|| (ratio * 1000.0).round() / 1000.0);
        self.reference = reference.into();
        self
    }

    /// Shows the ratio as a percentage.
    pub fn percent(mut self) -> Self {
        self.ratio_kind = RatioKind::Percent;
        self
    }
}

/// One issue-8 target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target as the issue states it.
    pub target: String,
    /// What was compared.
    pub measured: String,
    /// The measured ratio.
    pub value: f64,
    /// The largest ratio that meets it.
    pub limit: f64,
    /// `value <= limit`.
    pub met: bool,
    /// How far off: `value / limit` (above 1 is a miss by that factor).
    pub factor: f64,
}

impl Target {
    /// Checks `value <= limit`.
    pub fn check(target: &str, measured: &str, value: f64, limit: f64) -> Self {
        Self {
            target: target.into(),
            measured: measured.into(),
            value: (value * 1000.0).round() / 1000.0,
            limit,
            met: value.is_finite() && value <= limit,
            factor: (value / limit * 100.0).round() / 100.0,
        }
    }
}

fn fmt_value(v: f64, unit: Unit) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        Unit::Mib => format!("{v:.1} MiB"),
        Unit::Ms if v >= 100.0 => format!("{v:.0} ms"),
        Unit::Ms => format!("{v:.1} ms"),
    }
}

fn fmt_ratio(r: Option<f64>, kind: RatioKind) -> String {
    match (r, kind) {
        (None, _) => "-".into(),
        (Some(r), RatioKind::Times) => format!("{r:.2}x"),
        (Some(r), RatioKind::Percent) => format!("{:.1} %", r * 100.0),
    }
}

fn fmt_target_value(t: &Target) -> String {
    if t.limit < 1.0 {
        format!("{:.1} %", t.value * 100.0)
    } else {
        format!("{:.2}x", t.value)
    }
}

fn fmt_target_limit(t: &Target) -> String {
    if t.limit < 1.0 {
        format!("<= {:.0} %", t.limit * 100.0)
    } else {
        format!("<= {:.1}x", t.limit)
    }
}

/// The markdown tables.
pub fn markdown(rows: &[Row], targets: &[Target]) -> String {
    let mut out = String::new();
    let mut section = "";
    for r in rows {
        if r.section != section {
            section = &r.section;
            out.push_str(&format!(
                "\n**{section}**\n\n| measurement | n | p50 | p99 | ratio | relative to |\n|---|---:|---:|---:|---:|---|\n"
            ));
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.measure,
            r.n.map_or_else(|| "-".into(), |n| n.to_string()),
            fmt_value(r.p50, r.unit),
            r.p99.map_or_else(|| "-".into(), |v| fmt_value(v, r.unit)),
            fmt_ratio(r.ratio, r.ratio_kind),
            if r.reference.is_empty() {
                "-"
            } else {
                &r.reference
            },
        ));
    }
    out.push_str("\n**Issue 8 targets**\n\n| target | measured as | value | limit | met |\n|---|---|---:|---:|---|\n");
    for t in targets {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.target,
            t.measured,
            fmt_target_value(t),
            fmt_target_limit(t),
            if t.met {
                "yes".to_owned()
            } else {
                format!("no ({:.1}x over)", t.factor)
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows_and_targets() {
        let s = Stats::from_ms(&[100.0, 200.0, 300.0]);
        let rows = vec![
            Row::stats("create", "bare", &s).vs(1.0, "floor"),
            Row::value("memory", "pss", Some(4), 150.0, Unit::Mib)
                .vs(0.146, "memoryMib")
                .percent(),
        ];
        let t = vec![
            Target::check("<= 1.2x floor", "http p50 / bare p50", 3.0, 1.2),
            Target::check("PSS <= 25 %", "pss / memoryMib", 0.146, 0.25),
        ];
        let md = markdown(&rows, &t);
        assert!(
            md.contains("| bare | 3 | 200 ms | 300 ms | 1.00x | floor |"),
            "{md}"
        );
        assert!(
            md.contains("| pss | 4 | 150.0 MiB | - | 14.6 % | memoryMib |"),
            "{md}"
        );
        assert!(md.contains("| 3.00x | <= 1.2x | no (2.5x over) |"), "{md}");
        assert!(md.contains("| 14.6 % | <= 25 % | yes |"), "{md}");
    }
}
