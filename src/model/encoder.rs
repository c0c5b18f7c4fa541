//! The frozen BERT/RoBERTa encoder, written so that every row of a batch can
//! carry its own key/value prefix in every layer.
//!
//! The forward takes already-assembled input embeddings (see
//! `engine::assemble`): shallow prompts live in the embeddings. Two layer
//! stacks compute the same function: [`Encoder::encode_cpu`] for serving on
//! the CPU (fused kernels on plain buffers, each row's deep prompt read in
//! place), and [`Encoder::encode`] in candle ops for training (it has a
//! backward) and for other devices, with deep prompts gathered into one
//! padded tensor that each layer slices.

use candle_core::{CpuStorage, D, DType, Device, Layout, Storage, Tensor};

use super::ModelError;
use super::config::ModelConfig;
use super::kernels;
use super::weights::Weights;

/// Which kernels to use. Serving on the CPU uses our fused kernels
/// ([`Encoder::encode_cpu`]) and on other devices candle's fused layer norm
/// and softmax; training needs composed versions because the fused ones have
/// no backward (their gradients silently come back as `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsMode {
    /// Serving: fused kernels on the CPU, candle's ops elsewhere.
    Serve,
    /// Serving through candle's ops on every device: the forward a GPU
    /// runs, forced on the CPU so that CI tests it (`serve --kernels candle`).
    ServeOps,
    /// Training: composed ops with a backward.
    Train,
}

/// A dense layer stored as `[out, in]`, as in the checkpoint.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// `x @ W^T + b` over the last dimension of a 2-D input.
    ///
    /// When `x` is part of a backward graph but the weight is frozen (not a
    /// variable nor derived from one), the product goes through
    /// [`FrozenWeight`] so that backward computes only `∂x` and not the
    /// weight gradient nobody reads (about a third of a training step).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.track_op() && !self.weight.track_op() && x.device().is_cpu() {
            let y = x.detach().matmul(&self.weight.t()?)?;
            return x
                .apply_op2(&y, FrozenWeight(self.weight.clone()))?
                .broadcast_add(&self.bias);
        }
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    fn load(w: &Weights, name: &str, out: usize, inp: usize) -> Result<Self, ModelError> {
        Ok(Linear {
            weight: w.get(&format!("{name}.weight"), &[out, inp])?,
            bias: w.get(&format!("{name}.bias"), &[out])?,
        })
    }
}

/// `x @ W^T` for a frozen `W`: the forward passes through the product
/// computed outside the graph (second argument); the backward returns only
/// `∂x = g W`. CPU only (the caller checks).
struct FrozenWeight(Tensor);

impl candle_core::CustomOp2 for FrozenWeight {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        _x: &candle_core::CpuStorage,
        _xl: &candle_core::Layout,
        y: &candle_core::CpuStorage,
        yl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match yl.contiguous_offsets() {
            Some((0, n)) if n == yl.shape().elem_count() => Ok((y.clone(), yl.shape().clone())),
            _ => candle_core::bail!(
                "frozen-weight-matmul: the product must be a fresh contiguous tensor"
            ),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.0)?), None))
    }
}

/// Layer norm parameters.
#[derive(Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(w: &Weights, name: &str, hidden: usize, eps: f64) -> Result<Self, ModelError> {
        // Old TF-converted checkpoints call them gamma/beta.
        let (weight, bias) = match w.get_opt(&format!("{name}.weight"), &[hidden])? {
            Some(weight) => (weight, w.get(&format!("{name}.bias"), &[hidden])?),
            None => (
                w.get(&format!("{name}.gamma"), &[hidden])?,
                w.get(&format!("{name}.beta"), &[hidden])?,
            ),
        };
        Ok(Norm { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
        match mode {
            OpsMode::Serve | OpsMode::ServeOps => {
                candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32)
            }
            OpsMode::Train => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let centered = x.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                normed
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
        }
    }
}

fn softmax_last(x: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
    match mode {
        OpsMode::Serve | OpsMode::ServeOps => candle_nn::ops::softmax_last_dim(x),
        OpsMode::Train => candle_nn::ops::softmax(x, D::Minus1),
    }
}

struct Layer {
    /// Query, key and value fused into one `[3*hidden, hidden]` matmul.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
}

/// Where each row's tokens sit: packed `[N]` for per-token work, padded
/// `[B, S]` for attention.
pub struct Packing<'a> {
    pub batch: usize,
    pub seq: usize,
    /// `[B*S]` padded slot → packed token (padding reads token 0).
    pub pad_index: &'a Tensor,
    /// `[N]` packed token → padded slot.
    pub pack_index: &'a Tensor,
}

/// One row of a batch for [`Encoder::encode_cpu`]: its packed tokens and
/// its deep prompt, if any.
#[derive(Clone, Copy)]
pub struct RowSpan<'a> {
    /// First packed token of the row.
    pub start: usize,
    /// Positions of the row (virtual and text tokens).
    pub len: usize,
    /// `[n, layers·2·hidden]` in PEFT's layout.
    pub deep: Option<&'a Tensor>,
}

/// The input vector of a packed token, for [`Encoder::embed_cpu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Row `id` of the word embeddings.
    Word(u32),
    /// Virtual token `index` of shallow prompt number `task`.
    Virtual { task: u32, index: u32 },
}

/// The distinct tensors among `ts` (by id), made contiguous, and each
/// input's index among them: one storage guard per tensor, since a
/// parking_lot read lock taken twice by one thread can deadlock behind a
/// waiting writer.
fn distinct<'t>(
    ts: impl IntoIterator<Item = Option<&'t Tensor>>,
) -> candle_core::Result<(Vec<Tensor>, Vec<Option<usize>>)> {
    let mut ids = Vec::new();
    let mut owned = Vec::new();
    let mut index = Vec::new();
    for t in ts {
        index.push(match t {
            Some(t) => match ids.iter().position(|&id| id == t.id()) {
                Some(i) => Some(i),
                None => {
                    ids.push(t.id());
                    owned.push(t.contiguous()?);
                    Some(owned.len() - 1)
                }
            },
            None => None,
        });
    }
    Ok((owned, index))
}

/// The f32 values of a contiguous CPU tensor behind its storage guard.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused forward: expected a contiguous tensor")
    };
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[start..end]),
        _ => candle_core::bail!("fused forward: expected an f32 CPU tensor"),
    }
}

/// The frozen encoder: embeddings, transformer layers and (when the
/// checkpoint has one) the BERT pooler.
pub struct Encoder {
    pub config: ModelConfig,
    device: Device,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
}

impl Encoder {
    /// Builds the encoder from a checkpoint's tensors.
    pub fn new(config: ModelConfig, w: &Weights, device: &Device) -> Result<Self, ModelError> {
        let h = config.hidden_size;
        let i = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let q = Linear::load(w, &format!("{p}.attention.self.query"), h, h)?;
            let k = Linear::load(w, &format!("{p}.attention.self.key"), h, h)?;
            let v = Linear::load(w, &format!("{p}.attention.self.value"), h, h)?;
            let cat = |a: [&Tensor; 3]| Tensor::cat(&a, 0).map_err(ModelError::from);
            let qkv = Linear {
                weight: cat([&q.weight, &k.weight, &v.weight])?,
                bias: cat([&q.bias, &k.bias, &v.bias])?,
            };
            let attn_out = Linear::load(w, &format!("{p}.attention.output.dense"), h, h)?;
            let attn_norm = Norm::load(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?;
            let output = Linear::load(w, &format!("{p}.output.dense"), h, i)?;
            let out_norm = Norm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?;
            layers.push(Layer {
                qkv,
                attn_out,
                attn_norm,
                intermediate: Linear::load(w, &format!("{p}.intermediate.dense"), i, h)?,
                output,
                out_norm,
            });
        }
        let pooler = match w.get_opt("pooler.dense.weight", &[h, h])? {
            Some(weight) => Some(Linear {
                weight,
                bias: w.get("pooler.dense.bias", &[h])?,
            }),
            None => None,
        };
        Ok(Encoder {
            word_embeddings: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_embeddings: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type_embeddings: w.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            embed_norm: Norm::load(w, "embeddings.LayerNorm", h, eps)?,
            layers,
            pooler,
            device: device.clone(),
            config,
        })
    }

    /// The device every tensor of this encoder lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The word embedding matrix `[vocab, hidden]` (prompt init from text or
    /// vocabulary samples, and the model fingerprint).
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings
    }

    /// Whether the checkpoint carries a BERT pooler.
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// Embedding layer on pre-gathered input vectors `[N, hidden]`:
    /// adds token-type and position embeddings, then layer norm.
    pub fn embed(
        &self,
        inputs: &Tensor,
        type_ids: &Tensor,
        position_ids: &Tensor,
        mode: OpsMode,
    ) -> candle_core::Result<Tensor> {
        let types = self.token_type_embeddings.index_select(type_ids, 0)?;
        let pos = self.position_embeddings.index_select(position_ids, 0)?;
        let x = ((inputs + types)? + pos)?;
        self.embed_norm.forward(&x, mode)
    }

    /// The embedding layer of the fused CPU forward: packed `[N, hidden]`
    /// from each token's source (word or virtual vector, read in place),
    /// token type and position, in one parallel pass.
    pub fn embed_cpu(
        &self,
        sources: &[Source],
        prompts: &[Option<&Tensor>],
        types: &[u32],
        positions: &[u32],
    ) -> candle_core::Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        if types.len() != sources.len() || positions.len() != sources.len() {
            candle_core::bail!("fused embed: sources, types and positions differ in length");
        }
        let (tables, table_of) = distinct(prompts.iter().copied())?;
        let fixed = [
            &self.word_embeddings,
            &self.token_type_embeddings,
            &self.position_embeddings,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
        ];
        let guards: Vec<_> = fixed
            .iter()
            .copied()
            .chain(&tables)
            .map(|t| t.storage_and_layout())
            .collect();
        let data: Vec<&[f32]> = guards
            .iter()
            .map(|(s, l)| cpu_f32(s, l))
            .collect::<candle_core::Result<_>>()?;
        let (words, type_emb, pos_emb, gamma, beta) = (data[0], data[1], data[2], data[3], data[4]);
        fn row<'a>(
            table: &'a [f32],
            h: usize,
            i: u32,
            what: &str,
        ) -> candle_core::Result<&'a [f32]> {
            match table.get(i as usize * h..(i as usize + 1) * h) {
                Some(r) => Ok(r),
                None => candle_core::bail!("fused embed: {what} {i} out of range"),
            }
        }
        let tokens: Vec<kernels::EmbedToken> = sources
            .iter()
            .zip(types.iter().zip(positions))
            .map(|(src, (&ty, &pos))| {
                let input = match *src {
                    Source::Word(id) => row(words, h, id, "word id")?,
                    Source::Virtual { task, index } => {
                        let Some(Some(t)) = table_of.get(task as usize) else {
                            candle_core::bail!("fused embed: no shallow prompt for task {task}")
                        };
                        row(data[fixed.len() + t], h, index, "virtual token")?
                    }
                };
                Ok(kernels::EmbedToken {
                    input,
                    token_type: row(type_emb, h, ty, "token type")?,
                    position: row(pos_emb, h, pos, "position")?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let mut out = vec![0f32; sources.len() * h];
        kernels::embed(&mut out, &tokens, gamma, beta, c.layer_norm_eps as f32);
        Ok(out)
    }

    /// Whether [`Encoder::encode_cpu`] serves this mode on this device.
    pub fn fused(&self, mode: OpsMode) -> bool {
        mode == OpsMode::Serve
            && self.device.is_cpu()
            && self
                .config
                .hidden_size
                .is_multiple_of(self.config.num_attention_heads)
    }

    /// The serving layer stack on the CPU: packed `[N, hidden]` in and out.
    ///
    /// Works on plain buffers allocated once per batch and reused by every
    /// layer; weights and deep prompts are read in place through their
    /// storage guards. Per layer: the QKV matmul (bias added later), fused
    /// attention per (row, head) straight from and into packed tokens (see
    /// [`kernels::attention`]), the output matmul with bias + residual +
    /// layer norm in one pass, the FFN matmul with bias + GELU in one pass,
    /// and the last matmul with bias + residual + layer norm. The linear
    /// layers run the same gemm calls as candle's `matmul`.
    pub fn encode_cpu(&self, x: Vec<f32>, rows: &[RowSpan<'_>]) -> candle_core::Result<Tensor> {
        use crate::profile::time;
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let eps = c.layer_norm_eps as f32;
        let n = x.len() / h;
        if x.len() != n * h {
            candle_core::bail!(
                "fused forward: {} input values are not rows of {h}",
                x.len()
            );
        }
        let (deep, deep_of_row) = distinct(rows.iter().map(|r| r.deep))?;
        let deep_guards: Vec<_> = deep.iter().map(|t| t.storage_and_layout()).collect();
        let deep_data: Vec<&[f32]> = deep_guards
            .iter()
            .map(|(s, l)| cpu_f32(s, l))
            .collect::<candle_core::Result<_>>()?;
        let width = c.num_hidden_layers * 2 * h;
        let attn_rows: Vec<kernels::AttnRow> = rows
            .iter()
            .zip(&deep_of_row)
            .map(|(r, d)| {
                let prefix = d.map_or(&[][..], |i| deep_data[i]);
                if prefix.len() % width != 0 {
                    candle_core::bail!("fused forward: deep prompt is not [n, {width}]");
                }
                Ok(kernels::AttnRow {
                    start: r.start,
                    len: r.len,
                    prefix,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        if attn_rows.iter().map(|r| r.len).sum::<usize>() != n
            || attn_rows
                .windows(2)
                .any(|w| w[0].start + w[0].len != w[1].start)
            || attn_rows.first().is_some_and(|r| r.start != 0)
        {
            candle_core::bail!("fused forward: rows do not tile the {n} packed tokens");
        }

        // Every weight of every layer, read in place for this call.
        let weights: Vec<&Tensor> = self
            .layers
            .iter()
            .flat_map(|l| {
                [
                    &l.qkv.weight,
                    &l.qkv.bias,
                    &l.attn_out.weight,
                    &l.attn_out.bias,
                    &l.attn_norm.weight,
                    &l.attn_norm.bias,
                    &l.intermediate.weight,
                    &l.intermediate.bias,
                    &l.output.weight,
                    &l.output.bias,
                    &l.out_norm.weight,
                    &l.out_norm.bias,
                ]
            })
            .collect();
        let guards: Vec<_> = weights.iter().map(|t| t.storage_and_layout()).collect();
        let w: Vec<&[f32]> = guards
            .iter()
            .map(|(s, l)| cpu_f32(s, l))
            .collect::<candle_core::Result<_>>()?;

        let mut x = x;
        let mut qkv = vec![0f32; n * 3 * h];
        let mut ctx = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        let mut x1 = vec![0f32; n * h];
        let mut mid = vec![0f32; n * inter];
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        for (l, w) in w.chunks_exact(12).enumerate() {
            let [
                qkv_w,
                qkv_b,
                ao_w,
                ao_b,
                an_g,
                an_b,
                in_w,
                in_b,
                out_w,
                out_b,
                on_g,
                on_b,
            ]: [&[f32]; 12] = w.try_into().expect("12 tensors per layer");
            time("qkv.matmul", || kernels::matmul_wt(&mut qkv, &x, qkv_w, h));
            let dims = kernels::AttnDims {
                hidden: h,
                heads: c.num_attention_heads,
                layers: c.num_hidden_layers,
                layer: l,
                scale,
            };
            time("attention", || {
                kernels::attention(&mut ctx, &qkv, qkv_b, &attn_rows, dims)
            });
            time("attn_out.matmul", || {
                kernels::matmul_wt(&mut proj, &ctx, ao_w, h)
            });
            let norm = kernels::NormParams {
                bias: ao_b,
                gamma: an_g,
                beta: an_b,
                eps,
            };
            time("attn_out.norm", || {
                kernels::residual_norm(&mut x1, &proj, &x, norm)
            });
            time("ffn.in.matmul", || {
                kernels::matmul_wt(&mut mid, &x1, in_w, h)
            });
            time("ffn.gelu", || kernels::bias_gelu(&mut mid, in_b));
            time("ffn.out.matmul", || {
                kernels::matmul_wt(&mut proj, &mid, out_w, inter)
            });
            let norm = kernels::NormParams {
                bias: out_b,
                gamma: on_g,
                beta: on_b,
                eps,
            };
            time("ffn.out.norm", || {
                kernels::residual_norm(&mut x, &proj, &x1, norm)
            });
        }
        Tensor::from_vec(x, (n, h), &self.device)
    }

    /// Runs all layers on packed tokens and returns them packed `[N, hidden]`,
    /// in candle ops (training, other devices).
    ///
    /// * `x`: `[N, hidden]` embeddings, rows packed without padding.
    /// * `pack`: how packed tokens map to the padded `[B, S]` grid that
    ///   attention uses.
    /// * `mask`: additive `[B, 1, 1, P + S]` (0 = attend, very negative = skip).
    /// * `prefix`: deep prompts `[L, 2, B, heads, P, head_dim]` (key = 0,
    ///   value = 1), already padded to the batch's longest prefix P.
    pub fn encode(
        &self,
        x: &Tensor,
        pack: &Packing<'_>,
        mask: &Tensor,
        prefix: Option<&Tensor>,
        mode: OpsMode,
    ) -> candle_core::Result<Tensor> {
        let (b, s) = (pack.batch, pack.seq);
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = self.config.head_dim();
        let scale = 1.0 / (d as f64).sqrt();
        let mut x = x.clone();
        use crate::profile::time;
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = time("qkv.matmul", || layer.qkv.forward(&x))?;
            let qkv = time("qkv.split", || {
                qkv.index_select(pack.pad_index, 0)?
                    .reshape((b, s, 3, heads, d))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()
            })?;
            let q = time("q.scale", || qkv.get(0)? * scale)?;
            let (mut k, mut v) = (qkv.get(1)?, qkv.get(2)?);
            if let Some(p) = prefix {
                let pl = p.get(l)?;
                k = time("prefix.cat", || Tensor::cat(&[&pl.get(0)?, &k], 2))?;
                v = time("prefix.cat", || Tensor::cat(&[&pl.get(1)?, &v], 2))?;
            }
            let scores = time("attn.scores", || q.matmul(&k.t()?))?;
            let scores = time("attn.mask", || scores.broadcast_add(mask))?;
            let probs = time("attn.softmax", || softmax_last(&scores, mode))?;
            let ctx = time("attn.context", || probs.matmul(&v))?;
            let ctx = time("attn.merge", || {
                ctx.transpose(1, 2)?
                    .reshape((b * s, h))?
                    .index_select(pack.pack_index, 0)
            })?;
            let attn = time("attn_out.matmul", || layer.attn_out.forward(&ctx))?;
            let x1 = time("attn_out.norm", || {
                layer.attn_norm.forward(&(attn + &x)?, mode)
            })?;
            let inter = time("ffn.in.matmul", || layer.intermediate.forward(&x1))?;
            let inter = time("ffn.gelu", || inter.gelu_erf())?;
            let out = time("ffn.out.matmul", || layer.output.forward(&inter))?;
            x = time("ffn.out.norm", || {
                layer.out_norm.forward(&(out + x1)?, mode)
            })?;
        }
        Ok(x)
    }

    /// BERT pooler (`tanh(W h + b)`) over given vectors `[N, hidden]`.
    pub fn pool(&self, first: &Tensor) -> Result<Tensor, ModelError> {
        let p = self.pooler.as_ref().ok_or_else(|| {
            ModelError::Missing(
                "tensor \"pooler.dense.weight\": this task pools through the BERT pooler but the checkpoint has none".into(),
            )
        })?;
        Ok(p.forward(first)?.tanh()?)
    }

    /// Zero tensor helper on this encoder's device.
    pub fn zeros(&self, shape: &[usize]) -> candle_core::Result<Tensor> {
        Tensor::zeros(shape, DType::F32, &self.device)
    }
}
