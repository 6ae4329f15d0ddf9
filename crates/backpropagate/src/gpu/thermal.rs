//! The thermal guard: pause training when the GPU passes a temperature limit, and go on
//! once it has cooled a few degrees below it (hysteresis, so it does not flap around
//! the limit). Consumer GPUs in laptops and small cases reach their limits in long runs;
//! a pause costs minutes, a throttling or crashing card costs the run.

/// What the guard decided for one temperature reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThermalChange {
    Pause,
    Resume,
}

#[derive(Debug, Clone)]
pub struct ThermalGuard {
    limit_c: f32,
    resume_below_c: f32,
    hot: bool,
}

impl ThermalGuard {
    /// Pauses at `limit_c` and resumes 5 °C below it.
    pub fn new(limit_c: f32) -> Self {
        ThermalGuard {
            limit_c,
            resume_below_c: limit_c - 5.0,
            hot: false,
        }
    }

    pub fn limit_c(&self) -> f32 {
        self.limit_c
    }

    /// Feeds one reading; returns a change when the state flips.
    pub fn update(&mut self, temp_c: f32) -> Option<ThermalChange> {
        if !self.hot && temp_c >= self.limit_c {
            self.hot = true;
            return Some(ThermalChange::Pause);
        }
        if self.hot && temp_c < self.resume_below_c {
            self.hot = false;
            return Some(ThermalChange::Resume);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_at_the_limit_and_resumes_five_degrees_below() {
        let mut g = ThermalGuard::new(85.0);
        let readings = [70.0, 84.9, 85.0, 86.0, 82.0, 80.1, 79.9, 84.0, 85.5];
        let changes: Vec<_> = readings.iter().map(|&t| g.update(t)).collect();
        use ThermalChange::*;
        assert_eq!(
            changes,
            vec![
                None,
                None,
                Some(Pause),
                None,
                None,
                None,
                Some(Resume),
                None,
                Some(Pause)
            ]
        );
    }
}
