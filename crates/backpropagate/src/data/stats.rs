//! What users see before training: how many samples, how long, how many were cut.

use std::fmt;
use ts_rs::TS;

use serde::{Deserialize, Serialize};

use super::encode::Encoded;
use super::record::Format;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct DatasetStats {
    pub format: Format,
    pub samples: usize,
    /// Token lengths before truncation.
    pub len_min: usize,
    pub len_median: usize,
    pub len_p95: usize,
    pub len_max: usize,
    pub total_tokens: usize,
    pub trainable_tokens: usize,
    pub max_seq_len: usize,
    /// Samples longer than `max_seq_len` (cut at the end).
    pub truncated: usize,
    /// Samples left with no trainable token after truncation (skipped in training).
    pub no_trainable: usize,
}

impl DatasetStats {
    pub fn compute(format: Format, encoded: &[Encoded], max_seq_len: usize) -> Self {
        let mut lens: Vec<usize> = encoded.iter().map(|e| e.full_len).collect();
        lens.sort_unstable();
        DatasetStats {
            format,
            samples: encoded.len(),
            len_min: lens.first().copied().unwrap_or(0),
            len_median: percentile(&lens, 50.0),
            len_p95: percentile(&lens, 95.0),
            len_max: lens.last().copied().unwrap_or(0),
            total_tokens: encoded.iter().map(|e| e.input_ids.len()).sum(),
            trainable_tokens: encoded.iter().map(Encoded::trainable_tokens).sum(),
            max_seq_len,
            truncated: encoded.iter().filter(|e| e.truncated()).count(),
            no_trainable: encoded.iter().filter(|e| e.trainable_tokens() == 0).count(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "format:           {}", self.format)?;
        writeln!(f, "samples:          {}", self.samples)?;
        writeln!(
            f,
            "tokens/sample:    min {} · median {} · p95 {} · max {}",
            self.len_min, self.len_median, self.len_p95, self.len_max
        )?;
        writeln!(
            f,
            "tokens:           {} total, {} trained on",
            self.total_tokens, self.trainable_tokens
        )?;
        write!(
            f,
            "truncated:        {} of {} (max_seq_len {})",
            self.truncated, self.samples, self.max_seq_len
        )?;
        if self.no_trainable > 0 {
            write!(
                f,
                "\nskipped:          {} (nothing left to learn after truncation)",
                self.no_trainable
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<usize> = (1..=20).collect();
        assert_eq!(percentile(&v, 50.0), 10);
        assert_eq!(percentile(&v, 95.0), 19);
        assert_eq!(percentile(&v, 100.0), 20);
        assert_eq!(percentile(&[7], 95.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
