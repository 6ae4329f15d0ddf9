//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW` semantics) over
//! flat f32 buffers, plus global-norm gradient clipping. Kept on the host in plain
//! slices: LoRA parameters are small, the update is exactly reproducible, and the
//! moments save to a checkpoint as they are.

#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken so far.
    pub t: u64,
    /// First and second moments, one buffer per parameter tensor.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(sizes: &[usize], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..p.len() {
                p[i] *= decay;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] -= step_size * m[i] / denom;
            }
        }
    }
}

/// Global L2 norm of all gradients; scales them down to `max_norm` when above it
/// (0 disables clipping). Returns the norm before clipping, as PyTorch does.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        grads
            .iter_mut()
            .flat_map(|g| g.iter_mut())
            .for_each(|x| *x *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let mut opt = AdamW::new(&[3], 0.9, 0.999, 1e-8, 0.0);
        let mut p = vec![vec![1.0f32, -1.0, 0.5]];
        opt.step(&mut p, &[vec![0.3, -2.0, 0.0]], 0.1);
        assert!((p[0][0] - 0.9).abs() < 1e-6);
        assert!((p[0][1] + 0.9).abs() < 1e-6);
        assert_eq!(p[0][2], 0.5);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut opt = AdamW::new(&[1], 0.9, 0.999, 1e-8, 0.5);
        let mut p = vec![vec![2.0f32]];
        opt.step(&mut p, &[vec![0.0]], 0.1);
        assert!((p[0][0] - 1.9).abs() < 1e-6, "{}", p[0][0]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
        let mut g = vec![vec![0.3f32]];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g[0][0], 0.3);
    }
}
