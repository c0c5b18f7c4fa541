//! The frozen BERT/RoBERTa encoder, written so that every row of a batch can
//! carry its own key/value prefix in every layer.
//!
//! The forward takes already-assembled input embeddings (see
//! `engine::assemble`): shallow prompts live in the embeddings. Two layer
//! stacks compute the same function, each in its own file, behind the one
//! choice [`Encoder::fused`] makes from the [`OpsMode`]:
//! - `fused.rs`, [`Encoder::encode_cpu`]: serving on the CPU (fused kernels
//!   on plain buffers, each row's deep prompt read in place);
//! - `ops.rs`, [`Encoder::encode`]: candle's ops, for other devices (and
//!   training there: composed ops have a backward), with deep prompts
//!   gathered into one padded tensor that each layer slices;
//! - `varlen.rs`, [`Encoder::encode_varlen`]: the device backend (what a
//!   GPU serves with): candle's ops on packed rows, our varlen attention
//!   kernel, weights in the serving dtype;
//! - `train.rs`, [`Encoder::encode_train`]: training on the CPU, the fused
//!   stack as one autograd op with a hand-written backward.
//!
//! This file holds what they share: the weights, the layer norm, the
//! pooler.

use candle_core::{D, DType, Device, Tensor};

use super::ModelError;
use super::config::ModelConfig;
use super::kernels::{self, int8::QWeight, packed::PackedWeight};
use super::weights::Weights;

mod fused;
mod ops;
mod train;
mod varlen;

pub use fused::{RowSpan, Source};
pub use ops::Packing;
pub use train::TrainRow;

/// Which kernels to use. Serving on the CPU uses our fused kernels
/// ([`Encoder::encode_cpu`]) and on other devices candle's fused layer norm
/// and softmax. Training on the CPU uses the fused training kernels with
/// hand-written backward passes ([`Encoder::encode_train`]); elsewhere it
/// needs candle's composed ops, because candle's fused layer norm and
/// softmax have no backward (their gradients silently come back as `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsMode {
    /// Serving: fused kernels on the CPU, candle's ops elsewhere.
    Serve,
    /// Serving through candle's ops on every device: the forward a GPU
    /// runs, forced on the CPU so that CI tests it (`serve --kernels candle`).
    ServeOps,
    /// Serving through the device backend ([`Encoder::encode_varlen`]):
    /// what a GPU runs, forced on the CPU with `serve --kernels device`.
    ServeDevice,
    /// Training: the fused training op on the CPU, composed ops elsewhere.
    Train,
    /// Training through candle's composed ops on every device: the
    /// reference the fused training op is tested against.
    TrainOps,
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
            OpsMode::Serve | OpsMode::ServeOps | OpsMode::ServeDevice => {
                candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32)
            }
            OpsMode::Train | OpsMode::TrainOps => {
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

#[derive(Clone)]
struct Layer {
    /// Query, key and value fused into one `[3*hidden, hidden]` matmul.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
}

impl Layer {
    /// Everything after attention, in candle's ops on packed `[N, hidden]`
    /// rows: output projection, residual and layer norm, feed-forward,
    /// residual and layer norm. `ctx` is the merged heads' context, `x`
    /// the layer's input. Shared by the candle-ops and device stacks.
    fn after_attention(
        &self,
        ctx: &Tensor,
        x: &Tensor,
        mode: OpsMode,
    ) -> candle_core::Result<Tensor> {
        use crate::profile::time;
        let attn = time("attn_out.matmul", || self.attn_out.forward(ctx))?;
        let x1 = time("attn_out.norm", || {
            self.attn_norm.forward(&(attn + x)?, mode)
        })?;
        let inter = time("ffn.in.matmul", || self.intermediate.forward(&x1))?;
        let inter = time("ffn.gelu", || inter.gelu_erf())?;
        let out = time("ffn.out.matmul", || self.output.forward(&inter))?;
        time("ffn.out.norm", || self.out_norm.forward(&(out + x1)?, mode))
    }

    /// The layer's tensors in the order [`LayerData::new`] reads them.
    fn tensors(&self) -> [&Tensor; 12] {
        [
            &self.qkv.weight,
            &self.qkv.bias,
            &self.attn_out.weight,
            &self.attn_out.bias,
            &self.attn_norm.weight,
            &self.attn_norm.bias,
            &self.intermediate.weight,
            &self.intermediate.bias,
            &self.output.weight,
            &self.output.bias,
            &self.out_norm.weight,
            &self.out_norm.bias,
        ]
    }
}

/// One layer's weights as plain slices read in place (the fused serving
/// and training stacks), named as in [`Layer`]: `w` weight, `b` bias, `g`
/// norm gain.
struct LayerData<'a> {
    qkv_w: &'a [f32],
    qkv_b: &'a [f32],
    ao_w: &'a [f32],
    ao_b: &'a [f32],
    an_g: &'a [f32],
    an_b: &'a [f32],
    in_w: &'a [f32],
    in_b: &'a [f32],
    out_w: &'a [f32],
    out_b: &'a [f32],
    on_g: &'a [f32],
    on_b: &'a [f32],
}

impl<'a> LayerData<'a> {
    /// From the slices of [`Layer::tensors`], in its order.
    fn new(w: &[&'a [f32]]) -> Self {
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
        LayerData {
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
        }
    }
}

/// Linear-layer weights a precision other than f32 serves with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Quantize {
    /// The checkpoint's f32 weights.
    #[default]
    None,
    /// Int8 weights per output channel, int8 activations per row
    /// ([`crate::model::kernels::int8`]); CPU serving only.
    Int8,
}

/// The dtype the model is resident in (`serve --dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ServeDtype {
    /// f16 on a CUDA GPU, f32 elsewhere.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl ServeDtype {
    /// The dtype to cast the encoder to on `device`; `device_backend` says
    /// whether the device backend will serve (`--kernels device`, or auto
    /// on a CUDA GPU), the only one that serves 16-bit weights.
    pub fn resolve(self, device: &Device, device_backend: bool) -> Result<DType, ModelError> {
        let dtype = match self {
            ServeDtype::Auto if device.is_cuda() && device_backend => DType::F16,
            ServeDtype::Auto | ServeDtype::F32 => DType::F32,
            ServeDtype::F16 => DType::F16,
            ServeDtype::Bf16 => DType::BF16,
        };
        if dtype != DType::F32 && !device_backend {
            return Err(ModelError::Unsupported(format!(
                "--dtype {}: 16-bit weights serve through the device backend only (--kernels device, or --kernels auto on a CUDA GPU)",
                dtype.as_str()
            )));
        }
        Ok(dtype)
    }
}

/// One linear weight as the fused CPU forward reads it: packed once, in
/// the layout its kernel consumes.
pub(crate) enum PackedLinear {
    /// f32 panels ([`crate::model::kernels::packed`]).
    F32(PackedWeight),
    /// Int8 per output channel (`--quantize int8`,
    /// [`crate::model::kernels::int8`]).
    Int8(QWeight),
}

impl PackedLinear {
    /// `out ← x · wᵀ`; `w` is the same weight unpacked, for where gemm
    /// outruns the packed f32 kernel: its plain build, and batches of
    /// `gemm_from` rows or more ([`Encoder::pack`] measures where).
    pub(crate) fn forward(
        &self,
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        k: usize,
        gemm_from: usize,
    ) {
        match self {
            PackedLinear::Int8(q) => kernels::int8::qmatmul_wt(out, x, q),
            PackedLinear::F32(p)
                if kernels::Simd::current() > kernels::Simd::Plain && x.len() / k < gemm_from =>
            {
                kernels::packed::pmatmul_wt(out, x, p)
            }
            PackedLinear::F32(_) => kernels::matmul_wt(out, x, w, k),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            PackedLinear::F32(p) => p.bytes(),
            PackedLinear::Int8(q) => q.bytes(),
        }
    }
}

/// One layer's four linear weights, packed.
pub(crate) struct PackedLayer {
    pub(crate) qkv: PackedLinear,
    pub(crate) attn_out: PackedLinear,
    pub(crate) intermediate: PackedLinear,
    pub(crate) output: PackedLinear,
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
    /// Every layer's linear weights packed for serving ([`Encoder::pack`]),
    /// in f32 or int8; the checkpoint's weights stay (training and candle's
    /// forward read them).
    packed: Option<(Quantize, Vec<PackedLayer>)>,
    /// Batches of this many rows or more run the f32 linear layers on gemm
    /// rather than the packed kernel ([`Encoder::pack`] measures it).
    gemm_from_rows: usize,
    /// The dtype every weight is held in ([`Encoder::cast`]; f32 as loaded).
    dtype: DType,
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
            packed: None,
            gemm_from_rows: usize::MAX,
            dtype: DType::F32,
            device: device.clone(),
            config,
        })
    }

    /// Packs every layer's four linear weights once for the fused CPU
    /// forward, in `q`'s precision, so that no forward repacks them (gemm
    /// packs its operands per call: 43 MB of MiniLM weights per batch,
    /// which a batch of a few rows cannot amortize). Costs the packed bytes
    /// on top of the checkpoint's ([`Encoder::packed_bytes`]: f32 as much
    /// again, int8 about a quarter).
    ///
    /// Where the fused forward does not serve (another device, odd head
    /// sizes) f32 packing is skipped, and int8 is refused rather than
    /// silently ignored.
    pub fn pack(&mut self, q: Quantize) -> Result<(), ModelError> {
        if !self.fused(OpsMode::Serve) {
            return match q {
                Quantize::None => Ok(()),
                Quantize::Int8 => Err(ModelError::Unsupported(
                    "quantization here: --quantize int8 serves through the fused CPU forward only (CPU device, hidden size a multiple of the heads)"
                        .into(),
                )),
            };
        }
        let pack = |t: &Tensor| -> Result<PackedLinear, ModelError> {
            let k = t.dim(1)?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok(match q {
                Quantize::None => PackedLinear::F32(PackedWeight::pack(&v, k)),
                Quantize::Int8 => PackedLinear::Int8(QWeight::quantize(&v, k)),
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(PackedLayer {
                    qkv: pack(&l.qkv.weight)?,
                    attn_out: pack(&l.attn_out.weight)?,
                    intermediate: pack(&l.intermediate.weight)?,
                    output: pack(&l.output.weight)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        if q == Quantize::None {
            self.gemm_from_rows = self.gemm_crossover(&layers)?;
        }
        self.packed = Some((q, layers));
        Ok(())
    }

    /// Rows from which gemm (which packs its operands per call) beats the
    /// packed f32 kernel on this CPU, measured once on the FFN's first
    /// linear layer (~70 ms for MiniLM): on AMD Zen 4 the packed kernel is
    /// as fast as gemm even at 2,048 rows; on an Intel Xeon with full-width
    /// AVX-512, gemm is ~20% faster there (`cargo bench --bench linear`).
    /// Both give the same answers to float rounding. Batches of 1,024 rows
    /// or more go to gemm when it was at least 10% faster at 2,048.
    fn gemm_crossover(&self, layers: &[PackedLayer]) -> Result<usize, ModelError> {
        const PROBE: usize = 2048;
        let (Some(layer), Some(packed)) = (self.layers.first(), layers.first()) else {
            return Ok(usize::MAX);
        };
        if kernels::Simd::current() == kernels::Simd::Plain {
            return Ok(usize::MAX);
        }
        let w = layer.intermediate.weight.flatten_all()?.to_vec1::<f32>()?;
        let k = layer.intermediate.weight.dim(1)?;
        let n = w.len() / k;
        let x: Vec<f32> = (0..PROBE * k)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
            .collect();
        let mut out = vec![0f32; PROBE * n];
        let mut best = |f: &mut dyn FnMut(&mut [f32])| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f(&mut out);
                    t.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        let p = best(&mut |o| packed.intermediate.forward(o, &x, &w, k, usize::MAX));
        let g = best(&mut |o| kernels::matmul_wt(o, &x, &w, k));
        let from = if g.as_secs_f64() < 0.9 * p.as_secs_f64() {
            PROBE / 2
        } else {
            usize::MAX
        };
        tracing::debug!(
            packed_ms = p.as_secs_f64() * 1e3,
            gemm_ms = g.as_secs_f64() * 1e3,
            gemm_from_rows = from,
            "f32 linear layers: packed kernel against gemm at {PROBE} rows"
        );
        Ok(from)
    }

    /// Rows from which the f32 linear layers run on gemm (`usize::MAX`:
    /// never; see [`Encoder::pack`]).
    pub fn gemm_from_rows(&self) -> usize {
        self.gemm_from_rows
    }

    /// Holds every weight in `dtype` (`serve --dtype`): f16 or bf16 halve
    /// the resident model and run on a GPU's tensor cores. Only the device
    /// backend ([`OpsMode::ServeDevice`]) serves a 16-bit encoder: the fused
    /// CPU forward, its packed weights and training read f32, so casting
    /// after [`Encoder::pack`] is refused.
    pub fn cast(&mut self, dtype: DType) -> Result<(), ModelError> {
        if dtype == self.dtype {
            return Ok(());
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Unsupported(format!(
                "dtype {dtype:?}: the encoder serves in f32, f16 or bf16"
            )));
        }
        if self.packed.is_some() {
            return Err(ModelError::Unsupported(
                "casting packed weights: the fused CPU forward serves f32 only".into(),
            ));
        }
        let c = |t: &mut Tensor| -> Result<(), ModelError> {
            *t = t.to_dtype(dtype)?;
            Ok(())
        };
        c(&mut self.word_embeddings)?;
        c(&mut self.position_embeddings)?;
        c(&mut self.token_type_embeddings)?;
        c(&mut self.embed_norm.weight)?;
        c(&mut self.embed_norm.bias)?;
        for l in &mut self.layers {
            for lin in [
                &mut l.qkv,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.output,
            ] {
                c(&mut lin.weight)?;
                c(&mut lin.bias)?;
            }
            for n in [&mut l.attn_norm, &mut l.out_norm] {
                c(&mut n.weight)?;
                c(&mut n.bias)?;
            }
        }
        if let Some(p) = &mut self.pooler {
            c(&mut p.weight)?;
            c(&mut p.bias)?;
        }
        self.dtype = dtype;
        Ok(())
    }

    /// The dtype the weights are held in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The precision the linear layers serve in.
    pub fn quantization(&self) -> Quantize {
        self.packed.as_ref().map_or(Quantize::None, |(q, _)| *q)
    }

    /// Bytes the packed weights hold (0 before [`Encoder::pack`]).
    pub fn packed_bytes(&self) -> usize {
        self.packed.as_ref().map_or(0, |(_, layers)| {
            layers
                .iter()
                .flat_map(|l| [&l.qkv, &l.attn_out, &l.intermediate, &l.output])
                .map(PackedLinear::bytes)
                .sum()
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

    /// Whether [`Encoder::encode_cpu`] serves this mode on this device.
    pub fn fused(&self, mode: OpsMode) -> bool {
        mode == OpsMode::Serve
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && self
                .config
                .hidden_size
                .is_multiple_of(self.config.num_attention_heads)
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
