//! Learning-rate schedules with linear warmup, the formulas of transformers' `optimization.py`:
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`). As with torch's `LambdaLR`, optimizer step
//! `k` (0-based: the number of steps already taken) runs at `base_lr · factor(k)`, so with a warmup the
//! first step has learning rate 0.

use crate::error::{Error, Result};

/// Which schedule (`--schedule constant|linear|cosine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    /// Constant after the warmup.
    #[default]
    Constant,
    /// Linear decay from the base rate to 0 at `total_steps`.
    Linear,
    /// Half a cosine from the base rate to 0 at `total_steps`.
    Cosine,
}

impl ScheduleKind {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::invalid(format!(
                "unknown schedule {s:?} (expected constant, linear or cosine)"
            ))),
        }
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A schedule: kind, warmup steps (`--warmup`) and the total number of optimizer steps (the decay
/// reaches 0 there; unused by `Constant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// A constant learning rate, no warmup.
    pub fn constant() -> Self {
        Schedule::default()
    }

    /// Errors if a decaying schedule has no total step count or the warmup exceeds it.
    pub fn validate(&self) -> Result<()> {
        if self.kind != ScheduleKind::Constant {
            if self.total_steps == 0 {
                return Err(Error::invalid(format!(
                    "schedule {}: total_steps must be > 0",
                    self.kind
                )));
            }
            if self.warmup_steps > self.total_steps {
                return Err(Error::invalid(format!(
                    "schedule {}: warmup_steps {} exceeds total_steps {}",
                    self.kind, self.warmup_steps, self.total_steps
                )));
            }
        }
        Ok(())
    }

    /// The multiplier of the base learning rate for optimizer step `step` (0-based), in f64 as the
    /// Python lambdas compute it.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// `base_lr · factor(step)`, rounded to f32.
    pub fn lr(&self, base_lr: f32, step: u64) -> f32 {
        (base_lr as f64 * self.factor(step)) as f32
    }
}
