//! Figures the generator keeps: a fixed-size histogram for per-packet values (millions of
//! samples, no allocation per sample) and percentiles of small sample sets.

use serde::Serialize;

/// Microsecond histogram: 1 µs buckets up to 10 ms, then one overflow bucket; the maximum is
/// kept exactly.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    overflow: u64,
    count: u64,
    sum: u128,
    max: u64,
}

/// Values at or above this many µs land in the overflow bucket.
const LIMIT_US: usize = 10_000;

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: vec![0; LIMIT_US], overflow: 0, count: 0, sum: 0, max: 0 }
    }
}

/// Percentiles of a [`Histogram`], in µs.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, us: u64) {
        match self.buckets.get_mut(us as usize) {
            Some(bucket) => *bucket += 1,
            None => self.overflow += 1,
        }
        self.count += 1;
        self.sum += u128::from(us);
        self.max = self.max.max(us);
    }

    /// The smallest value with at least `q` of the samples at or below it (overflowed samples
    /// report the maximum).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (us, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return us as u64;
            }
        }
        self.max
    }

    /// Count, mean and percentiles.
    pub fn summary(&self) -> Summary {
        Summary {
            count: self.count,
            mean_us: if self.count == 0 { 0.0 } else { self.sum as f64 / self.count as f64 },
            p50_us: self.quantile(0.5),
            p99_us: self.quantile(0.99),
            p999_us: self.quantile(0.999),
            max_us: self.max,
        }
    }
}

/// Percentiles of a small sample set (set-up times), in ms.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct MsSummary {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl MsSummary {
    /// Sorts `samples` (ms) and reads the percentiles.
    pub fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
        Self { count: samples.len(), p50_ms: at(0.5), p95_ms: at(0.95), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_samples() {
        let mut h = Histogram::default();
        for us in 1..=100 {
            h.record(us);
        }
        h.record(50_000);
        let s = h.summary();
        assert_eq!(s.count, 101);
        assert_eq!(s.p50_us, 51);
        assert_eq!(s.p99_us, 100);
        assert_eq!(s.max_us, 50_000);
        assert_eq!(h.quantile(1.0), 50_000, "an overflowed sample reports the maximum");
    }

    #[test]
    fn ms_percentiles() {
        let mut v: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = MsSummary::of(&mut v);
        assert_eq!((s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms), (100.0, 190.0, 198.0, 200.0));
    }
}
