//! Seeded random tasks and inputs, for benchmarks and tests that need many
//! tasks of given shapes without training any.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::{Head, Pooling, ShallowPrompt, TaskModel, Template};
use crate::model::{Encoded, Linear, ModelConfig};

/// Which kind of prompt a synthetic task gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Shallow,
    Deep,
}

fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let d = Normal::new(0.0f32, std).expect("valid std");
    (0..n).map(|_| d.sample(rng)).collect()
}

/// A task with a random prompt of `n` tokens and a random linear head.
pub fn random_task(
    config: &ModelConfig,
    device: &Device,
    kind: Kind,
    n: usize,
    labels: usize,
    seed: u64,
) -> candle_core::Result<TaskModel> {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = config.hidden_size;
    let (shallow, deep) = match kind {
        Kind::Shallow => (
            Some(ShallowPrompt {
                embeddings: Tensor::from_vec(normal(&mut rng, n * h, 0.5), (n, h), device)?,
                template: Template::prefix(n),
            }),
            None,
        ),
        Kind::Deep => {
            let w = config.num_hidden_layers * 2 * h;
            (
                None,
                Some(Tensor::from_vec(
                    normal(&mut rng, n * w, 0.5),
                    (n, w),
                    device,
                )?),
            )
        }
    };
    let head = Head::Linear(Linear {
        weight: Tensor::from_vec(normal(&mut rng, labels * h, 0.2), (labels, h), device)?,
        bias: Tensor::from_vec(normal(&mut rng, labels, 0.2), labels, device)?,
    });
    Ok(TaskModel {
        shallow,
        deep,
        head,
        pooling: Pooling::Pooler,
    })
}

/// A fake single-text input of exactly `len` tokens (`[CLS] … [SEP]` shape,
/// ids drawn from the ordinary vocabulary range).
pub fn random_input(config: &ModelConfig, len: usize, seed: u64) -> Encoded {
    let mut rng = StdRng::seed_from_u64(seed);
    let lo = 1000.min(config.vocab_size / 2) as u32;
    let hi = config.vocab_size as u32;
    let mut ids: Vec<u32> = (0..len).map(|_| rng.random_range(lo..hi)).collect();
    if len >= 2 {
        ids[0] = 101.min(hi - 1);
        ids[len - 1] = 102.min(hi - 1);
    }
    Encoded {
        ids,
        type_ids: vec![0; len],
        pair_start: None,
    }
}
