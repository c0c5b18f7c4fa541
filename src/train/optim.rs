//! AdamW with state that can be saved and restored.
//!
//! candle-nn's `AdamW` keeps its moment estimates private, so a run resumed
//! from a checkpoint had to restart them from zero: the first steps after a
//! resume then took full-size, badly scaled updates, and a resumed run did
//! not end where an uninterrupted one would. This optimizer names its state
//! after the parameters, so checkpoints carry it and a resume continues the
//! exact trajectory.
//!
//! The update is decoupled weight decay (Loshchilov & Hutter 2019) with
//! bias-corrected moments (Kingma & Ba 2015):
//! `θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Hyper-parameters shared by every group.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to √v̂ so that parameters with tiny gradients do not blow up.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    group: usize,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables split into groups, each with its own learning
/// rate (the prompt and the head learn at different rates).
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Updates done so far (drives the bias correction).
    steps: u64,
}

/// Checkpoint key of the step counter (stored as a one-element tensor).
const STEPS_KEY: &str = "steps";

impl AdamW {
    /// One slot per `(name, var)`; `group_of` says which learning-rate group
    /// each variable belongs to.
    pub fn new(
        vars: &[(String, Var)],
        group_of: impl Fn(&str) -> usize,
        cfg: AdamWConfig,
    ) -> candle_core::Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    group: group_of(name),
                    var: var.clone(),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            slots,
            steps: 0,
        })
    }

    /// One update; `lrs[g]` is group g's learning rate for this step.
    /// Variables without a gradient (not reached by the loss) keep their
    /// value and moments, as in PyTorch.
    pub fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> candle_core::Result<()> {
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let correct1 = 1.0 / (1.0 - beta1.powi(self.steps as i32));
        let correct2 = 1.0 / (1.0 - beta2.powi(self.steps as i32));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let lr = lrs[slot.group];
            let m = ((&slot.m * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((&v * correct2)?.sqrt()? + eps)?;
            let update = ((&m * correct1)? / denom)?;
            let theta = ((slot.var.as_tensor() * (1.0 - lr * weight_decay))? - (update * lr)?)?;
            slot.var.set(&theta)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// The moments (`m.<name>`, `v.<name>`) and the step counter, for a
    /// checkpoint.
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.copy()?);
            out.insert(format!("v.{}", s.name), s.v.copy()?);
        }
        let dev = self
            .slots
            .first()
            .map(|s| s.m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        // f32 holds step counts exactly up to 2^24, far past any run here.
        out.insert(
            STEPS_KEY.to_string(),
            Tensor::new(&[self.steps as f32], &dev)?,
        );
        Ok(out)
    }

    /// Restores what [`AdamW::state`] saved; refuses missing or mis-shaped
    /// moments by name rather than training on with the wrong state.
    pub fn set_state(&mut self, state: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let steps = state
            .get(STEPS_KEY)
            .ok_or_else(|| anyhow::anyhow!("optimizer state: missing {STEPS_KEY}"))?;
        let steps = steps.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(
            steps.len() == 1 && steps[0] >= 0.0,
            "optimizer state: {STEPS_KEY} must be one non-negative number"
        );
        for s in &mut self.slots {
            for (key, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let name = format!("{key}.{}", s.name);
                let t = state
                    .get(&name)
                    .ok_or_else(|| anyhow::anyhow!("optimizer state: missing {name}"))?;
                anyhow::ensure!(
                    t.dims() == slot.dims(),
                    "optimizer state {name}: expected shape {:?}, found {:?}",
                    slot.dims(),
                    t.dims()
                );
                *slot = t.to_device(slot.device())?;
            }
        }
        self.steps = steps[0] as u64;
        Ok(())
    }
}
