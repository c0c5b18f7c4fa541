//! The device backend's layer stack: what serving runs on a GPU (and on the
//! CPU with `serve --kernels device`, through the kernel's host build, so
//! that CI tests it). Rows stay packed without padding through every layer:
//! the linear layers, layer norms and GELU are candle's ops on `[N, hidden]`
//! (cuBLAS and candle's kernels on a GPU), and attention is our varlen
//! kernel ([`crate::model::kernels::varlen`]), in which each token reads
//! only its own row's keys and its own task's deep prefix, straight from
//! the batch's prefix table. No padded `[B, heads, S, P+S]` grid, no mask.
//! Weights are in the encoder's serving dtype (`serve --dtype`).

use candle_core::Tensor;

use super::{Encoder, OpsMode};
use crate::model::kernels::varlen::{VarlenDims, VarlenIndex, varlen_attention};
use crate::profile::time;

impl Encoder {
    /// Runs all layers on packed tokens.
    ///
    /// * `x`: `[N, hidden]` embeddings (after the embedding layer norm);
    /// * `prefix`: `[P, layers·2·hidden]` the batch's deep prompts in PEFT's
    ///   layout (at least one row; rows without a deep prompt have
    ///   `prefix_len` 0 in the index);
    /// * `index`/`checked`: the rows, as a device tensor and as checked on
    ///   the host ([`VarlenIndex`]).
    pub fn encode_varlen(
        &self,
        x: &Tensor,
        prefix: &Tensor,
        index: &Tensor,
        checked: &VarlenIndex,
    ) -> candle_core::Result<Tensor> {
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.head_dim();
        let layers = self.layers.len();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut x = x.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = time("qkv.matmul", || layer.qkv.forward(&x))?;
            let dims = VarlenDims {
                heads,
                head_dim,
                layers,
                layer: l,
                scale,
            };
            let ctx = time("attention", || {
                varlen_attention(&qkv, prefix, index, checked, dims)
            })?;
            x = layer.after_attention(&ctx, &x, OpsMode::ServeDevice)?;
        }
        Ok(x)
    }
}
