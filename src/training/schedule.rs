//! Learning-rate schedules with linear warm-up, as HF's `get_*_schedule_with_warmup` compute them: the
//! factor for optimizer step `s` (0-based) is `s / warmup` during warm-up, then linear decay to 0 at
//! `total`, half a cosine, or constant.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Linear,
    Cosine,
    #[serde(alias = "constant_with_warmup")]
    Constant,
}
crate::named_setting!(Schedule);

impl Schedule {
    /// Learning rate at 0-based optimizer step `step`.
    pub fn lr(&self, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        base * match self {
            Schedule::Linear => ((total.saturating_sub(step)) as f64
                / (total.saturating_sub(warmup)).max(1) as f64)
                .max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
            Schedule::Constant => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_hf() {
        let s = Schedule::Linear;
        assert_eq!(s.lr(1.0, 0, 10, 110), 0.0);
        assert_eq!(s.lr(1.0, 5, 10, 110), 0.5);
        assert_eq!(s.lr(1.0, 10, 10, 110), 1.0);
        assert!((s.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(1.0, 110, 10, 110), 0.0);
        assert_eq!(Schedule::Cosine.lr(2.0, 10, 10, 110), 2.0);
        assert!((Schedule::Cosine.lr(2.0, 60, 10, 110) - 1.0).abs() < 1e-12);
        assert!(Schedule::Cosine.lr(2.0, 110, 10, 110).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(3.0, 50, 10, 110), 3.0);
        assert_eq!(Schedule::Linear.lr(1.0, 0, 0, 10), 1.0);
        assert_eq!("cosine".parse::<Schedule>(), Ok(Schedule::Cosine));
        assert_eq!(
            "constant_with_warmup".parse::<Schedule>(),
            Ok(Schedule::Constant)
        );
        assert!("cosin".parse::<Schedule>().is_err());
    }
}
