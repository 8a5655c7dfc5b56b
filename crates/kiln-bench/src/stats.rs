//! Samples and their summary (nearest-rank percentiles).

use std::time::Duration;

use serde::Serialize;

/// A summary of timing samples, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Median (nearest rank).
    pub p50_ms: f64,
    /// 99th percentile (nearest rank: with fewer than 100 samples, the largest).
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Smallest.
    pub min_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Every sample, in the order taken.
    pub samples_ms: Vec<f64>,
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounds to 0.01 ms (JSON stays readable).
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl Stats {
    /// Summarises millisecond samples.
    pub fn from_ms(samples: &[f64]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = if n == 0 {
            f64::NAN
        } else {
            sorted.iter().sum::<f64>() / n as f64
        };
        Self {
            n,
            p50_ms: round2(percentile(&sorted, 50.0)),
            p99_ms: round2(percentile(&sorted, 99.0)),
            mean_ms: round2(mean),
            min_ms: round2(sorted.first().copied().unwrap_or(f64::NAN)),
            max_ms: round2(sorted.last().copied().unwrap_or(f64::NAN)),
            samples_ms: samples.iter().map(|x| round2(*x)).collect(),
        }
    }

    /// Summarises durations.
    pub fn from_durations(samples: &[Duration]) -> Self {
        let ms: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        Self::from_ms(&ms)
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `a / b`, `NaN` when either is missing or `b` is zero.
pub fn ratio(a: f64, b: f64) -> f64 {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 15.0);
        assert_eq!(percentile(&v, 99.0), 30.0);
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&[7.0], 50.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn summary() {
        let s = Stats::from_ms(&[3.0, 1.0, 2.0]);
        assert_eq!(
            (s.n, s.p50_ms, s.p99_ms, s.min_ms, s.max_ms),
            (3, 2.0, 3.0, 1.0, 3.0)
        );
        assert_eq!(s.samples_ms, vec![3.0, 1.0, 2.0]);
        assert!(ratio(1.0, 0.0).is_nan());
    }
}
