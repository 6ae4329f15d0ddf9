//! Rows of tokens to model inputs: right padding, a causal mask that also keeps
//! packed samples apart, and the list of positions that predict a trained token.
//! Also the data order: a seeded shuffle per epoch with a cursor that a checkpoint
//! saves, so a resumed run sees exactly the batches it would have seen.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Encoded, PackedRow, IGNORE_INDEX};
use crate::model::{BatchInputs, FlatBatch};

/// One training row: a sample, or several packed samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<u32>,
    /// Start offsets of the samples in the row (`[0]` unless packed).
    pub starts: Vec<usize>,
}

impl From<&Encoded> for Row {
    fn from(e: &Encoded) -> Self {
        Row::single(e.input_ids.clone(), e.labels.clone())
    }
}

impl From<PackedRow> for Row {
    fn from(p: PackedRow) -> Self {
        Row {
            input_ids: p.input_ids,
            labels: p.labels,
            position_ids: p.position_ids,
            starts: p.starts,
        }
    }
}

impl Row {
    /// One unpacked sample: positions count from 0.
    pub fn single(input_ids: Vec<u32>, labels: Vec<i32>) -> Self {
        let position_ids = (0..input_ids.len() as u32).collect();
        Row {
            input_ids,
            labels,
            position_ids,
            starts: vec![0],
        }
    }

    /// Positions predicting a trained token (the label of the next position).
    pub fn target_count(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Mean token loss of `model` over `rows` in micro-batches (no dropout, no gradient
/// use): validation during training and held-out evaluation after it.
pub fn mean_loss(
    model: &crate::model::CausalLm,
    rows: &[Row],
    micro_batch: usize,
    pad_id: u32,
) -> Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in rows.iter().collect::<Vec<_>>().chunks(micro_batch.max(1)) {
        let batch = build(chunk, pad_id, model.device())?;
        if batch.target_count == 0 {
            continue;
        }
        sum += model.loss_sum(&batch, None)?.to_scalar::<f32>()? as f64;
        count += batch.target_count;
    }
    Ok(sum / count.max(1) as f64)
}

/// Builds the tensors for one micro-batch.
pub fn build(rows: &[&Row], pad_id: u32, device: &Device) -> Result<BatchInputs> {
    let b = rows.len();
    let t = rows
        .iter()
        .map(|r| r.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![pad_id; b * t];
    let mut pos = vec![0u32; b * t];
    let mut mask = vec![f32::NEG_INFINITY; b * t * t];
    let mut target_rows = Vec::new();
    let mut targets = Vec::new();
    let mut flat = FlatBatch::default();
    for (r, row) in rows.iter().enumerate() {
        let len = row.input_ids.len();
        let base = flat.tokens.len();
        flat.tokens.extend((0..len).map(|i| (r * t + i) as u32));
        let mut starts: Vec<usize> = row.starts.iter().copied().filter(|&s| s < len).collect();
        if starts.first() != Some(&0) {
            starts.insert(0, 0);
        }
        for (j, &s) in starts.iter().enumerate() {
            let end = starts.get(j + 1).copied().unwrap_or(len);
            flat.segments.push((base + s, end - s));
        }
        ids[r * t..r * t + len].copy_from_slice(&row.input_ids);
        pos[r * t..r * t + len].copy_from_slice(&row.position_ids);
        let segment_start = |i: usize| {
            row.starts
                .iter()
                .rev()
                .find(|&&s| s <= i)
                .copied()
                .unwrap_or(0)
        };
        for i in 0..t {
            let m = &mut mask[(r * t + i) * t..(r * t + i + 1) * t];
            if i < len {
                m[segment_start(i)..=i].fill(0.0);
            } else {
                // Padding queries attend to themselves only; their outputs carry no loss.
                m[i] = 0.0;
            }
        }
        for i in 0..len.saturating_sub(1) {
            let label = row.labels[i + 1];
            if label != IGNORE_INDEX {
                target_rows.push((r * t + i) as u32);
                flat.target_rows.push((base + i) as u32);
                targets.push(label as u32);
            }
        }
    }
    let target_count = targets.len();
    Ok(BatchInputs {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        position_ids: Tensor::from_vec(pos, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, 1, t, t), device)?,
        target_rows: Tensor::from_vec(target_rows, target_count, device)?,
        targets: Tensor::from_vec(targets, target_count, device)?,
        target_count,
        flat,
    })
}

/// Where the data order stands: epoch and position within its shuffle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub pos: usize,
}

/// Endless, reproducible stream of row indices.
pub struct DataOrder {
    n: usize,
    seed: u64,
    cursor: Cursor,
    order: Vec<usize>,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64, cursor: Cursor) -> Self {
        let mut d = DataOrder {
            n,
            seed,
            cursor,
            order: Vec::new(),
        };
        d.order = d.shuffle(cursor.epoch);
        d
    }

    fn shuffle(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n).collect();
        // (epoch + 1) keeps epoch 0 off the stream the train/validation split used.
        let stream = (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ stream);
        order.shuffle(&mut rng);
        order
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn next_indices(&mut self, count: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count && self.n > 0 {
            if self.cursor.pos >= self.n {
                self.cursor = Cursor {
                    epoch: self.cursor.epoch + 1,
                    pos: 0,
                };
                self.order = self.shuffle(self.cursor.epoch);
            }
            out.push(self.order[self.cursor.pos]);
            self.cursor.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: &[u32], labels: &[i32], starts: &[usize], pos: &[u32]) -> Row {
        Row {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            position_ids: pos.to_vec(),
            starts: starts.to_vec(),
        }
    }

    #[test]
    fn padding_masks_and_targets() {
        let a = row(&[1, 2, 3], &[-100, 2, 3], &[0], &[0, 1, 2]);
        let b = row(&[4, 5, 6, 7], &[-100, 5, -100, 7], &[0, 2], &[0, 1, 0, 1]);
        let batch = build(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3, 0], vec![4, 5, 6, 7]]
        );
        // Position i predicts label i+1.
        assert_eq!(
            batch.target_rows.to_vec1::<u32>().unwrap(),
            vec![0, 1, 4, 6]
        );
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 5, 7]);
        let mask = batch.mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let allowed = |r: usize, i: usize, j: usize| mask[(r * 4 + i) * 4 + j] == 0.0;
        assert!(allowed(0, 2, 0) && !allowed(0, 1, 2), "causal");
        assert!(
            allowed(1, 3, 2) && !allowed(1, 3, 1),
            "packed samples do not see each other"
        );
        assert!(
            allowed(0, 3, 3) && !allowed(0, 3, 0),
            "padding sees itself only"
        );
    }

    #[test]
    fn data_order_is_reproducible_from_a_cursor() {
        let mut a = DataOrder::new(5, 3, Cursor { epoch: 0, pos: 0 });
        let first: Vec<usize> = a.next_indices(7);
        let saved = a.cursor();
        let rest = a.next_indices(6);
        let mut b = DataOrder::new(5, 3, saved);
        assert_eq!(b.next_indices(6), rest);
        assert_eq!(saved, Cursor { epoch: 1, pos: 2 });
        let mut sorted = first[..5].to_vec();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            vec![0, 1, 2, 3, 4],
            "each epoch visits every row once"
        );
    }
}
