//! The trainable half of a task: the prompt, the optional reparameterization
//! encoder in front of it, and the classification head.
//!
//! Only these tensors are `Var`s; the base model's weights stay plain tensors,
//! so candle's backward never accumulates gradients into them (it still
//! computes some products it then drops; see `model::encoder`).
//!
//! [`Params::task_model`] builds a differentiable [`TaskModel`] for a training
//! step; [`Params::fold`] runs the encoder once and keeps only what serving
//! needs (the effective prompt and the head), as plain tensors.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};
use std::collections::HashMap;

use crate::engine::{Head, Pooling, ShallowPrompt, TaskModel, Template};
use crate::model::{Linear, Model};

/// Which soft-prompt method a task is trained with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Lester et al. 2021: trainable virtual-token embeddings at the input.
    PromptTuning,
    /// Liu et al. 2021 (v1): virtual tokens produced by a prompt encoder
    /// (bidirectional LSTM + MLP, or an MLP), placed by a template.
    PTuning,
    /// Liu et al. 2022 (v2): trainable key/value prefixes in every layer,
    /// optionally produced by an MLP.
    PTuningV2,
}

impl Method {
    /// Name used on the command line and in task provenance.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::PromptTuning => "prompt-tuning",
            Method::PTuning => "p-tuning",
            Method::PTuningV2 => "p-tuning-v2",
        }
    }

    /// Whether the prompt lives at the input (shallow) or in every layer.
    pub fn is_deep(self) -> bool {
        self == Method::PTuningV2
    }
}

/// The reparameterization applied to the raw prompt embedding during
/// training (folded away afterwards).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Reparam {
    /// The prompt is trained directly.
    None,
    /// P-Tuning: Linear-ReLU-Linear-ReLU-Linear; P-Tuning v2: Linear-Tanh-Linear
    /// to `layers*2*hidden` (PEFT's `prefix_projection`).
    Mlp,
    /// P-Tuning: bidirectional LSTM followed by Linear-ReLU-Linear.
    Lstm,
}

/// How the raw prompt embedding starts.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// N(0, 1), as PEFT's `nn.Embedding` default.
    Random,
    /// Word embeddings of token ids drawn uniformly from the vocabulary.
    Vocab,
    /// Word embeddings of this text's tokens (specials included), repeated or
    /// cut to the prompt length, as PEFT's `TEXT` init.
    Text(String),
}

/// The shape of what is trained.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    /// The soft-prompt method.
    pub method: Method,
    /// Virtual tokens (shallow) or prefix length (deep).
    pub num_virtual: usize,
    /// Encoder in front of the prompt during training.
    pub reparam: Reparam,
    /// Hidden width of the reparameterization encoder.
    pub encoder_hidden: usize,
    /// LSTM layers (P-Tuning with [`Reparam::Lstm`]).
    pub encoder_layers: usize,
    /// Placement of shallow prompts (`[P:n] {text}` for a prefix).
    pub template: String,
    /// How the head reads the encoder output.
    pub pooling: Pooling,
    /// Classes of the head.
    pub num_labels: usize,
}

impl Spec {
    /// Checks that the combination makes sense for `model`.
    pub fn check(&self, model: &Model) -> anyhow::Result<Template> {
        anyhow::ensure!(
            self.num_virtual > 0,
            "--virtual-tokens: expected at least 1, found 0"
        );
        anyhow::ensure!(
            self.num_labels >= 2,
            "labels: expected at least 2 distinct labels, found {}",
            self.num_labels
        );
        let template = Template::parse(&self.template).map_err(anyhow::Error::msg)?;
        match self.method {
            Method::PromptTuning => {
                anyhow::ensure!(
                    self.reparam == Reparam::None,
                    "--reparam: prompt-tuning trains the prompt directly; use p-tuning for an encoder"
                );
            }
            Method::PTuning => {
                anyhow::ensure!(
                    self.reparam != Reparam::None,
                    "--reparam: p-tuning needs a prompt encoder (mlp or lstm)"
                );
            }
            Method::PTuningV2 => {
                anyhow::ensure!(
                    self.reparam != Reparam::Lstm,
                    "--reparam: p-tuning-v2 supports none or mlp"
                );
            }
        }
        if self.method.is_deep() {
            anyhow::ensure!(
                template.num_virtual() == 0 && template.is_prefix(),
                "--template: deep prompts have no placement; leave the template out"
            );
        } else {
            anyhow::ensure!(
                template.num_virtual() == self.num_virtual,
                "--template: expected {} virtual tokens (--virtual-tokens), found {} in {:?}",
                self.num_virtual,
                template.num_virtual(),
                self.template
            );
        }
        if self.pooling == Pooling::Pooler && !model.encoder.has_pooler() {
            anyhow::bail!("--pooling pooler: the model has no pooler; use mean or first");
        }
        Ok(template)
    }
}

/// Trainable tensors of one task, by name.
pub struct Params {
    /// What these parameters are for.
    pub spec: Spec,
    template: Template,
    /// Prompt / encoder tensors (first optimizer group), then the head.
    vars: Vec<(String, Var)>,
}

/// Name of the raw prompt embedding.
pub const EMBEDDING: &str = "prompt.embedding";

fn uniform(
    rng: &mut StdRng,
    shape: &[usize],
    bound: f32,
    dev: &Device,
) -> candle_core::Result<Var> {
    let d = Uniform::new_inclusive(-bound, bound).expect("finite bound");
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| d.sample(rng)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
}

fn normal(rng: &mut StdRng, shape: &[usize], std: f32, dev: &Device) -> candle_core::Result<Var> {
    let d = Normal::new(0.0f32, std).expect("valid std");
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| d.sample(rng)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
}

impl Params {
    /// Fresh parameters for `spec` on `model`, seeded. Linear and LSTM
    /// layers start like PyTorch's defaults; the head like transformers'
    /// classifier (N(0, 0.02), zero bias).
    pub fn init(spec: Spec, model: &Model, init: &PromptInit, seed: u64) -> anyhow::Result<Self> {
        let template = spec.check(model)?;
        let c = model.config();
        let (h, layers) = (c.hidden_size, c.num_hidden_layers);
        let dev = model.encoder.device().clone();
        let mut rng = StdRng::seed_from_u64(seed);
        let n = spec.num_virtual;
        let e = spec.encoder_hidden;
        let mut vars: Vec<(String, Var)> = Vec::new();
        let mut push = |name: String, v: Var| vars.push((name, v));
        let linear = |rng: &mut StdRng,
                      name: &str,
                      out: usize,
                      inp: usize|
         -> candle_core::Result<Vec<(String, Var)>> {
            let b = 1.0 / (inp as f32).sqrt();
            Ok(vec![
                (
                    format!("{name}.weight"),
                    uniform(rng, &[out, inp], b, &dev)?,
                ),
                (format!("{name}.bias"), uniform(rng, &[out], b, &dev)?),
            ])
        };
        let deep_raw = spec.method.is_deep() && spec.reparam == Reparam::None;
        let emb_width = if deep_raw { layers * 2 * h } else { h };
        let embedding = match init {
            PromptInit::Random => normal(&mut rng, &[n, emb_width], 1.0, &dev)?,
            PromptInit::Vocab | PromptInit::Text(_) => {
                anyhow::ensure!(
                    !deep_raw,
                    "--init: vocab/text init needs a prompt of hidden width (prompt-tuning, p-tuning, or p-tuning-v2 with --reparam mlp)"
                );
                let ids: Vec<u32> = match init {
                    PromptInit::Vocab => (0..n)
                        .map(|_| rng.random_range(0..c.vocab_size as u32))
                        .collect(),
                    PromptInit::Text(t) => {
                        let enc = model.tokenizer.encode(t, None, usize::MAX, false)?;
                        enc.ids.iter().copied().cycle().take(n).collect()
                    }
                    PromptInit::Random => unreachable!(),
                };
                let ids = Tensor::new(ids.as_slice(), &dev)?;
                Var::from_tensor(
                    &model
                        .encoder
                        .word_embeddings()
                        .index_select(&ids, 0)?
                        .copy()?,
                )?
            }
        };
        push(EMBEDDING.into(), embedding);
        match (spec.method, spec.reparam) {
            (_, Reparam::None) => {}
            (Method::PTuning, Reparam::Mlp) => {
                for (name, v) in [
                    linear(&mut rng, "encoder.mlp.0", e, h)?,
                    linear(&mut rng, "encoder.mlp.2", e, e)?,
                    linear(&mut rng, "encoder.mlp.4", h, e)?,
                ]
                .into_iter()
                .flatten()
                {
                    push(name, v);
                }
            }
            (Method::PTuning, Reparam::Lstm) => {
                let b = 1.0 / (e as f32).sqrt();
                for l in 0..spec.encoder_layers {
                    let inp = if l == 0 { h } else { 2 * e };
                    for dir in ["", "_reverse"] {
                        push(
                            format!("encoder.lstm.weight_ih_l{l}{dir}"),
                            uniform(&mut rng, &[4 * e, inp], b, &dev)?,
                        );
                        push(
                            format!("encoder.lstm.weight_hh_l{l}{dir}"),
                            uniform(&mut rng, &[4 * e, e], b, &dev)?,
                        );
                        push(
                            format!("encoder.lstm.bias_ih_l{l}{dir}"),
                            uniform(&mut rng, &[4 * e], b, &dev)?,
                        );
                        push(
                            format!("encoder.lstm.bias_hh_l{l}{dir}"),
                            uniform(&mut rng, &[4 * e], b, &dev)?,
                        );
                    }
                }
                for (name, v) in [
                    linear(&mut rng, "encoder.mlp.0", 2 * e, 2 * e)?,
                    linear(&mut rng, "encoder.mlp.2", h, 2 * e)?,
                ]
                .into_iter()
                .flatten()
                {
                    push(name, v);
                }
            }
            (Method::PTuningV2, Reparam::Mlp) => {
                for (name, v) in [
                    linear(&mut rng, "encoder.mlp.0", e, h)?,
                    linear(&mut rng, "encoder.mlp.2", layers * 2 * h, e)?,
                ]
                .into_iter()
                .flatten()
                {
                    push(name, v);
                }
            }
            (m, r) => anyhow::bail!("{} with --reparam {r:?} is not supported", m.as_str()),
        }
        push(
            "head.weight".into(),
            normal(&mut rng, &[spec.num_labels, h], 0.02, &dev)?,
        );
        push(
            "head.bias".into(),
            Var::zeros(spec.num_labels, DType::F32, &dev)?,
        );
        Ok(Params {
            spec,
            template,
            vars,
        })
    }

    /// All trainable variables with their names.
    pub fn named(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Number of trained scalars.
    pub fn num_trainable(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn t(&self, name: &str) -> Tensor {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("parameter {name} exists for this spec"))
            .1
            .as_tensor()
            .clone()
    }

    fn lin(&self, name: &str) -> Linear {
        Linear {
            weight: self.t(&format!("{name}.weight")),
            bias: self.t(&format!("{name}.bias")),
        }
    }

    /// One LSTM direction over `x` `[n, in]`; PyTorch's gate order (i, f, g, o).
    fn lstm_direction(
        &self,
        x: &Tensor,
        l: usize,
        dir: &str,
        reverse: bool,
    ) -> candle_core::Result<Tensor> {
        let e = self.spec.encoder_hidden;
        let w_hh = self.t(&format!("encoder.lstm.weight_hh_l{l}{dir}"));
        let proj = Linear {
            weight: self.t(&format!("encoder.lstm.weight_ih_l{l}{dir}")),
            bias: self.t(&format!("encoder.lstm.bias_ih_l{l}{dir}")),
        }
        .forward(x)?
        .broadcast_add(&self.t(&format!("encoder.lstm.bias_hh_l{l}{dir}")))?;
        let n = x.dims()[0];
        let mut h = Tensor::zeros((1, e), DType::F32, x.device())?;
        let mut c = h.clone();
        let mut out = vec![h.clone(); n];
        let order: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in order {
            let gates = (proj.narrow(0, t, 1)? + h.matmul(&w_hh.t()?)?)?;
            let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, e)?)?;
            let f = candle_nn::ops::sigmoid(&gates.narrow(1, e, e)?)?;
            let g = gates.narrow(1, 2 * e, e)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * e, e)?)?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            out[t] = h.clone();
        }
        Tensor::cat(&out, 0)
    }

    /// The effective prompt: `[n, hidden]` (shallow) or `[n, layers*2*hidden]`
    /// (deep), differentiable with respect to the variables.
    pub fn effective_prompt(&self) -> candle_core::Result<Tensor> {
        let emb = self.t(EMBEDDING);
        match (self.spec.method, self.spec.reparam) {
            (_, Reparam::None) => Ok(emb),
            (Method::PTuning, Reparam::Mlp) => {
                let x = self.lin("encoder.mlp.0").forward(&emb)?.relu()?;
                let x = self.lin("encoder.mlp.2").forward(&x)?.relu()?;
                self.lin("encoder.mlp.4").forward(&x)
            }
            (Method::PTuning, Reparam::Lstm) => {
                let mut x = emb;
                for l in 0..self.spec.encoder_layers {
                    let fwd = self.lstm_direction(&x, l, "", false)?;
                    let bwd = self.lstm_direction(&x, l, "_reverse", true)?;
                    x = Tensor::cat(&[fwd, bwd], 1)?;
                }
                let x = self.lin("encoder.mlp.0").forward(&x)?.relu()?;
                self.lin("encoder.mlp.2").forward(&x)
            }
            (_, _) => {
                let x = self.lin("encoder.mlp.0").forward(&emb)?.tanh()?;
                self.lin("encoder.mlp.2").forward(&x)
            }
        }
    }

    fn build(&self, prompt: Tensor, head: Linear) -> TaskModel {
        let (shallow, deep) = if self.spec.method.is_deep() {
            (None, Some(prompt))
        } else {
            (
                Some(ShallowPrompt {
                    embeddings: prompt,
                    template: self.template.clone(),
                }),
                None,
            )
        };
        TaskModel {
            shallow,
            deep,
            head: Head::Linear(head),
            pooling: self.spec.pooling,
        }
    }

    /// The task as the engine runs it, differentiable (for a training step).
    pub fn task_model(&self) -> candle_core::Result<TaskModel> {
        Ok(self.build(self.effective_prompt()?, self.lin("head")))
    }

    /// The task with the encoder folded away: plain, detached copies of the
    /// effective prompt and the head, nothing else.
    pub fn fold(&self) -> candle_core::Result<TaskModel> {
        let plain = |t: Tensor| t.detach().copy();
        let head = self.lin("head");
        Ok(self.build(
            plain(self.effective_prompt()?)?,
            Linear {
                weight: plain(head.weight)?,
                bias: plain(head.bias)?,
            },
        ))
    }

    /// Copies of the current values, by name.
    pub fn values(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Sets every variable from `values`; refuses missing or mis-shaped ones.
    pub fn set_values(&self, values: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        for (name, var) in &self.vars {
            let t = values
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("parameter {name}: missing"))?;
            anyhow::ensure!(
                t.dims() == var.dims(),
                "parameter {name}: expected shape {:?}, found {:?}",
                var.dims(),
                t.dims()
            );
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    }
}
