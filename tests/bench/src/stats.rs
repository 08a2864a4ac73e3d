//! Medians and percentiles: the only statistics the report uses (robust on a noisy machine).

use std::time::Duration;

/// Nearest-rank percentile of sorted samples (0 when there are none).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0)
}

/// Median (mean of the two middle values for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match (s.get(n / 2), n.checked_sub(1).and_then(|m| s.get(m / 2))) {
        (Some(hi), Some(lo)) if n.is_multiple_of(2) => (lo + hi) / 2.0,
        (Some(mid), _) => *mid,
        _ => f64::NAN,
    }
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Summary of repeated timings: median, min, max and count, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl Timing {
    pub fn of(durations: &[Duration]) -> Self {
        let ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Self {
            median_ms: median(&ms),
            min_ms: min(&ms),
            max_ms: max(&ms),
            samples: ms.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn medians_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn timing_summary() {
        let t = Timing::of(&[
            Duration::from_millis(30),
            Duration::from_millis(10),
            Duration::from_millis(20),
        ]);
        assert_eq!(
            (t.median_ms, t.min_ms, t.max_ms, t.samples),
            (20.0, 10.0, 30.0, 3)
        );
    }
}
