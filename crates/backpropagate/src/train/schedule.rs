//! Learning-rate schedules, matching transformers' `get_*_schedule_with_warmup`:
//! the multiplier for optimizer step `s` (0-based) is computed from `s` itself, so the
//! first step of a warmup runs at lr 0 exactly as in a PEFT/TRL run.

use crate::config::LrSchedule;

pub fn lr_at(kind: LrSchedule, base_lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
    let s = step as f64;
    if step < warmup {
        return base_lr * s / (warmup.max(1) as f64);
    }
    let progress = (s - warmup as f64) / ((total.saturating_sub(warmup)).max(1) as f64);
    let factor = match kind {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => (1.0 - progress).max(0.0),
        LrSchedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    base_lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_like_transformers() {
        let lr = |s| lr_at(LrSchedule::Cosine, 1.0, s, 10, 110);
        assert_eq!(lr(0), 0.0);
        assert_eq!(lr(5), 0.5);
        assert_eq!(lr(10), 1.0);
        assert!((lr(60) - 0.5).abs() < 1e-12);
        assert!(lr(110).abs() < 1e-12);
    }

    #[test]
    fn linear_and_constant() {
        assert_eq!(lr_at(LrSchedule::Linear, 2.0, 55, 5, 105), 1.0);
        assert_eq!(lr_at(LrSchedule::Constant, 2.0, 99, 0, 100), 2.0);
        assert_eq!(lr_at(LrSchedule::Linear, 1.0, 0, 0, 10), 1.0);
    }
}
