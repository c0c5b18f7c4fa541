//! The candle-ops backend: the same function as [`super::fused`] in
//! candle's tensor ops over a padded `[B, S]` grid, with deep prompts
//! gathered into one padded tensor that each layer slices. What other
//! devices run when serving (and the CPU with `--kernels candle`), and what
//! training runs there (composed ops that have a backward; on the CPU with
//! `OpsMode::TrainOps`, the reference of the fused training op).

use candle_core::{D, Tensor};

use super::{Encoder, OpsMode};

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

fn softmax_last(x: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
    match mode {
        OpsMode::Serve | OpsMode::ServeOps | OpsMode::ServeDevice => {
            candle_nn::ops::softmax_last_dim(x)
        }
        OpsMode::Train | OpsMode::TrainOps => candle_nn::ops::softmax(x, D::Minus1),
    }
}

impl Encoder {
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
            x = layer.after_attention(&ctx, &x, mode)?;
        }
        Ok(x)
    }
}
