//! Packing: several short samples share one `max_seq_len` row so no compute is spent
//! on padding. Position ids restart at each sample and the first token of every
//! sample after the first carries no loss, so nothing is learned across the seam.

use serde::Serialize;

use super::encode::{Encoded, IGNORE_INDEX};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<u32>,
    /// Offsets where each sample starts within the row (for block-diagonal attention).
    pub starts: Vec<usize>,
}

/// Greedy packing in dataset order: a sample goes into the current row when it fits,
/// otherwise a new row starts. Order is kept so that a fixed seed gives fixed rows.
pub fn pack(samples: &[Encoded], max_seq_len: usize) -> Vec<PackedRow> {
    let mut rows = Vec::new();
    let mut row = empty_row(max_seq_len);
    for s in samples {
        let len = s.input_ids.len().min(max_seq_len);
        if len == 0 {
            continue;
        }
        if row.input_ids.len() + len > max_seq_len {
            rows.push(std::mem::replace(&mut row, empty_row(max_seq_len)));
        }
        let start = row.input_ids.len();
        row.starts.push(start);
        row.input_ids.extend_from_slice(&s.input_ids[..len]);
        row.labels.extend_from_slice(&s.labels[..len]);
        if start > 0 {
            row.labels[start] = IGNORE_INDEX;
        }
        row.position_ids.extend(0..len as u32);
    }
    if !row.input_ids.is_empty() {
        rows.push(row);
    }
    rows
}

fn empty_row(capacity: usize) -> PackedRow {
    PackedRow {
        input_ids: Vec::with_capacity(capacity),
        labels: Vec::with_capacity(capacity),
        position_ids: Vec::with_capacity(capacity),
        starts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, base: u32) -> Encoded {
        Encoded {
            line: 1,
            input_ids: (base..base + len as u32).collect(),
            labels: (base..base + len as u32).map(|x| x as i32).collect(),
            full_len: len,
        }
    }

    #[test]
    fn packs_in_order_and_never_learns_across_seams() {
        let rows = pack(&[sample(3, 10), sample(4, 20), sample(5, 30)], 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input_ids, vec![10, 11, 12, 20, 21, 22, 23]);
        assert_eq!(rows[0].labels, vec![10, 11, 12, -100, 21, 22, 23]);
        assert_eq!(rows[0].position_ids, vec![0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(rows[0].starts, vec![0, 3]);
        assert_eq!(rows[1].input_ids, vec![30, 31, 32, 33, 34]);
        assert_eq!(
            rows[1].labels[0], 30,
            "a row's first sample keeps its labels"
        );
    }

    #[test]
    fn every_row_fits() {
        let samples: Vec<_> = (1..40).map(|n| sample(n % 13 + 1, 0)).collect();
        let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
        let rows = pack(&samples, 16);
        assert!(rows.iter().all(|r| r.input_ids.len() <= 16));
        assert_eq!(rows.iter().map(|r| r.input_ids.len()).sum::<usize>(), total);
    }
}
