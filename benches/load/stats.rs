//! Latency statistics: nearest-rank percentiles and the mean.

/// One phase's request latencies.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Nanoseconds, sorted.
    sorted: Vec<u64>,
}

impl Latencies {
    /// The latencies `nanos`, in any order.
    pub fn new(mut nanos: Vec<u64>) -> Self {
        nanos.sort_unstable();
        Self { sorted: nanos }
    }

    /// Nearest-rank percentile, in microseconds.
    pub fn percentile_us(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.sorted.len()) - 1;
        self.sorted[index] as f64 / 1e3
    }

    /// The mean, in microseconds.
    pub fn mean_us(&self) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        self.sorted.iter().sum::<u64>() as f64 / self.sorted.len() as f64 / 1e3
    }
}
