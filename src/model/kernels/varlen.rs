//! Attention over packed rows of different lengths, each row with its own
//! task's deep prefix, as one candle op: the device backend's attention
//! (`encoder/varlen.rs`). The kernel is `varlen_attention.cu`; build.rs
//! compiles it to PTX for CUDA (feature `cuda`) and, always, for the host,
//! where [`VarlenAttention`]'s CPU forward runs every GPU thread's work in a
//! loop. So CI, which has no GPU, runs the very code the GPU runs, against
//! an f64 reference here and against PEFT through the backend's tests.
//!
//! Written by hand because candle has no variable-length attention: its
//! attention is matmul + softmax over a padded, masked `[B, heads, S, P+S]`
//! grid, and flash-attention crates neither build for CUDA 13 here nor take
//! a per-row deep prefix.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// Largest head size the kernel is built for.
pub const MAX_HEAD_DIM: usize = 128;

/// Threads per block of a launch (and of the host loop that emulates it).
const BLOCK: u32 = 128;

unsafe extern "C" {
    /// The host build of the kernel (`varlen_host.cpp`): every thread of a
    /// launch of `block_dim`-thread blocks, in order. Returns non-zero when
    /// `d` is over [`MAX_HEAD_DIM`] or `block_dim` is 0.
    fn sp_varlen_attention_host_f32(
        qkv: *const f32,
        prefix: *const f32,
        index: *const u32,
        out: *mut f32,
        n_tokens: u32,
        heads: u32,
        d: u32,
        layers: u32,
        layer: u32,
        scale: f32,
        block_dim: u32,
    ) -> i32;
}

/// One row of a batch: its packed tokens and its deep prefix's rows in the
/// batch's prefix table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VarlenRow {
    pub start: usize,
    pub len: usize,
    pub prefix_start: usize,
    pub prefix_len: usize,
}

/// Why an index was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("row {0} is empty")]
    EmptyRow(usize),
    #[error(
        "row {row} starts at token {start}, expected {expected} (rows must tile the tokens in order)"
    )]
    NotTiled {
        row: usize,
        start: usize,
        expected: usize,
    },
    #[error("row {row}'s prefix reaches row {end} of a {rows}-row prefix table")]
    PrefixOutOfRange { row: usize, end: usize, rows: usize },
    #[error("{0} tokens or rows do not fit the kernel's 32-bit indices")]
    TooLarge(usize),
}

/// The kernel's `index` array, checked: every token's row, then each row's
/// (start, len, prefix_start, prefix_len). Only [`VarlenIndex::new`] makes
/// one, after checking that the rows tile the tokens in order and that
/// every prefix lies inside the prefix table: the kernel indexes memory
/// with these values unchecked, on the GPU as on the host.
#[derive(Clone, Debug)]
pub struct VarlenIndex {
    values: Vec<u32>,
    tokens: usize,
    prefix_rows: usize,
}

impl VarlenIndex {
    /// Checks `rows` (in token order, covering `0..N` without gaps) against
    /// a prefix table of `prefix_rows` rows.
    pub fn new(rows: &[VarlenRow], prefix_rows: usize) -> Result<Self, IndexError> {
        let mut expected = 0usize;
        for (i, r) in rows.iter().enumerate() {
            if r.len == 0 {
                return Err(IndexError::EmptyRow(i));
            }
            if r.start != expected {
                return Err(IndexError::NotTiled {
                    row: i,
                    start: r.start,
                    expected,
                });
            }
            expected += r.len;
            let end = r.prefix_start.saturating_add(r.prefix_len);
            if end > prefix_rows {
                return Err(IndexError::PrefixOutOfRange {
                    row: i,
                    end,
                    rows: prefix_rows,
                });
            }
        }
        let tokens = expected;
        let fits = |v: usize| u32::try_from(v).map_err(|_| IndexError::TooLarge(v));
        fits(tokens + 4 * rows.len())?;
        fits(prefix_rows)?;
        let mut values = Vec::with_capacity(tokens + 4 * rows.len());
        for (i, r) in rows.iter().enumerate() {
            values.extend(std::iter::repeat_n(i as u32, r.len));
        }
        for r in rows {
            values.extend([r.start, r.len, r.prefix_start, r.prefix_len].map(|v| v as u32));
        }
        Ok(VarlenIndex {
            values,
            tokens,
            prefix_rows,
        })
    }

    /// The values to upload (`[N + 4·rows]`).
    pub fn values(&self) -> &[u32] {
        &self.values
    }

    /// Packed tokens N.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct VarlenDims {
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub layer: usize,
    /// Query scale, 1/√head_dim.
    pub scale: f32,
}

/// Attention of one layer: `qkv` `[N, 3·hidden]` (biases added, queries
/// not scaled), `prefix` `[P, layers·2·hidden]` (the batch's deep prompts;
/// may have no rows), `index` the same [`VarlenIndex`]'s values as a `[len]`
/// u32 tensor on the same device. Returns the context `[N, hidden]`.
pub fn varlen_attention(
    qkv: &Tensor,
    prefix: &Tensor,
    index: &Tensor,
    checked: &VarlenIndex,
    dims: VarlenDims,
) -> candle_core::Result<Tensor> {
    let op = VarlenAttention {
        dims,
        tokens: checked.tokens,
        prefix_rows: checked.prefix_rows,
        index_len: checked.values.len(),
    };
    qkv.apply_op3_no_bwd(prefix, index, &op)
}

/// The op; its sizes come from a checked [`VarlenIndex`], and every call
/// checks the tensors' shapes against them before the kernel runs.
struct VarlenAttention {
    dims: VarlenDims,
    tokens: usize,
    prefix_rows: usize,
    index_len: usize,
}

impl VarlenAttention {
    /// Checks shapes, dtypes and contiguity; returns `[N, hidden]`.
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<Shape> {
        let d = self.dims;
        let hidden = d.heads * d.head_dim;
        if d.head_dim == 0 || d.head_dim > MAX_HEAD_DIM || d.layer >= d.layers {
            candle_core::bail!(
                "varlen attention: head size {} (1..={MAX_HEAD_DIM}), layer {} of {}",
                d.head_dim,
                d.layer,
                d.layers
            );
        }
        let want = [
            ("qkv", l1, vec![self.tokens, 3 * hidden]),
            ("prefix", l2, vec![self.prefix_rows, d.layers * 2 * hidden]),
            ("index", l3, vec![self.index_len]),
        ];
        for (name, l, dims) in want {
            if l.dims() != dims.as_slice() {
                candle_core::bail!(
                    "varlen attention: {name} is {:?}, expected {dims:?}",
                    l.dims()
                );
            }
            if !l.is_contiguous() {
                candle_core::bail!("varlen attention: {name} must be contiguous");
            }
        }
        Ok(Shape::from((self.tokens, hidden)))
    }

    #[cfg(feature = "cuda")]
    fn blocks(&self) -> u32 {
        let threads = self.tokens * self.dims.heads;
        threads.div_ceil(BLOCK as usize) as u32
    }
}

/// The f32 values of a CPU storage (converted from f16/bf16).
fn host_f32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("varlen attention: not contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("varlen attention: f32, f16 or bf16 expected"),
    })
}

impl CustomOp3 for VarlenAttention {
    fn name(&self) -> &'static str {
        "varlen-attention"
    }

    /// The host build of the kernel (f16/bf16 computed in f32 and rounded
    /// back, as the GPU rounds its f32 accumulators on store).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.check(l1, l2, l3)?;
        let dtype = s1.dtype();
        if s2.dtype() != dtype {
            candle_core::bail!("varlen attention: qkv and prefix dtypes differ");
        }
        let qkv = host_f32(s1, l1)?;
        let prefix = host_f32(s2, l2)?;
        let CpuStorage::U32(index) = s3 else {
            candle_core::bail!("varlen attention: index must be u32");
        };
        let (a, b) = l3.contiguous_offsets().expect("checked contiguous");
        let index = &index[a..b];
        // The op's sizes came from a checked VarlenIndex, but a caller could
        // pair it with another tensor of the same length: check the values
        // again here, where it costs nothing next to the attention itself.
        check_values(index, self.tokens, self.prefix_rows)?;
        let mut out = vec![0f32; shape.elem_count()];
        let d = self.dims;
        // SAFETY: `check` matched every buffer's length to the sizes the
        // kernel reads with (qkv N·3·hidden, prefix P·layers·2·hidden, out
        // N·hidden, index N + 4·rows), `check_values` showed that every row
        // index, token range and prefix range in `index` lies inside them,
        // head_dim ≤ MAX_HEAD_DIM and layer < layers; the kernel writes only
        // `out` and keeps no pointer after it returns.
        let rc = unsafe {
            sp_varlen_attention_host_f32(
                qkv.as_ptr(),
                prefix.as_ptr(),
                index.as_ptr(),
                out.as_mut_ptr(),
                self.tokens as u32,
                d.heads as u32,
                d.head_dim as u32,
                d.layers as u32,
                d.layer as u32,
                d.scale,
                BLOCK,
            )
        };
        if rc != 0 {
            candle_core::bail!("varlen attention: host kernel refused its sizes");
        }
        let out = match dtype {
            DType::F32 => CpuStorage::F32(out),
            DType::F16 => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
            other => candle_core::bail!("varlen attention: {other:?} not supported"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.check(l1, l2, l3)?;
        match s1.dtype() {
            DType::F32 => cuda::launch::<f32>(self, "f32", s1, l1, s2, l2, s3, l3, shape),
            DType::F16 => cuda::launch::<half::f16>(self, "f16", s1, l1, s2, l2, s3, l3, shape),
            DType::BF16 => cuda::launch::<half::bf16>(self, "bf16", s1, l1, s2, l2, s3, l3, shape),
            other => candle_core::bail!("varlen attention: {other:?} not supported"),
        }
    }
}

/// The same checks as [`VarlenIndex::new`], on the values.
fn check_values(index: &[u32], tokens: usize, prefix_rows: usize) -> candle_core::Result<()> {
    let bad = |why: String| Err(candle_core::Error::Msg(format!("varlen attention: {why}")));
    if index.len() < tokens || !(index.len() - tokens).is_multiple_of(4) {
        return bad(format!("index of {} for {tokens} tokens", index.len()));
    }
    let (rows_of, meta) = index.split_at(tokens);
    let rows = meta.len() / 4;
    for (t, &r) in rows_of.iter().enumerate() {
        let r = r as usize;
        if r >= rows {
            return bad(format!("token {t} in row {r} of {rows}"));
        }
        let m = &meta[4 * r..4 * r + 4];
        let (start, len) = (m[0] as usize, m[1] as usize);
        if !(start <= t && t < start + len && start + len <= tokens) {
            return bad(format!("token {t} outside its row {r} ({start}+{len})"));
        }
        if m[2] as usize + m[3] as usize > prefix_rows {
            return bad(format!("row {r}'s prefix past the table of {prefix_rows}"));
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{BLOCK, VarlenAttention};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Shape};

    /// The PTX that build.rs made from varlen_attention.cu.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/varlen_attention.ptx"));

    /// The smallest head-size bound the kernels are built for that holds `d`.
    fn bound(d: usize) -> usize {
        [32, 64, 128].into_iter().find(|&b| d <= b).unwrap_or(128)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &VarlenAttention,
        ty: &str,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        shape: Shape,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let d = op.dims;
        let name = format!("sp_varlen_attention_{ty}_d{}", bound(d.head_dim));
        let func = dev.get_or_load_custom_func(&name, "softprompt_varlen_attention", PTX)?;
        let (a1, b1) = l1.contiguous_offsets().expect("checked contiguous");
        let (a2, b2) = l2.contiguous_offsets().expect("checked contiguous");
        let (a3, b3) = l3.contiguous_offsets().expect("checked contiguous");
        let qkv = s1.as_cuda_slice::<T>()?.slice(a1..b1);
        let prefix = s2.as_cuda_slice::<T>()?.slice(a2..b2);
        let index = s3.as_cuda_slice::<u32>()?.slice(a3..b3);
        // SAFETY: every element is written by the kernel (one thread per
        // (token, head) writes that head's d columns of its token's row).
        let out = unsafe { dev.alloc::<T>(shape.elem_count())? };
        let (n, heads, hd, layers, layer, scale) = (
            op.tokens as u32,
            d.heads as u32,
            d.head_dim as u32,
            d.layers as u32,
            d.layer as u32,
            d.scale,
        );
        let cfg = LaunchConfig {
            grid_dim: (op.blocks(), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&qkv);
        b.arg(&prefix);
        b.arg(&index);
        b.arg(&out);
        b.arg(&n);
        b.arg(&heads);
        b.arg(&hd);
        b.arg(&layers);
        b.arg(&layer);
        b.arg(&scale);
        // SAFETY: the argument list matches the kernel's signature in
        // varlen_attention.cu (three const T*/u32 pointers, the output, five
        // u32 and one f32); `check` matched the buffers to the sizes and the
        // index was checked on the host before upload (VarlenIndex::new),
        // so every read lies inside `qkv`, `prefix` and `index`.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::values;
    use candle_core::Device;

    /// Largest |out − want|.
    fn worst(out: &[f32], want: &[f64]) -> f64 {
        out.iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    /// f64 attention of one layer, written from the definition: for each
    /// row, head and query, softmax(q·kᵀ·scale) over the row's prefix keys
    /// then its own keys, times the values.
    fn reference(qkv: &[f32], prefix: &[f32], rows: &[VarlenRow], dims: VarlenDims) -> Vec<f64> {
        let (heads, d) = (dims.heads, dims.head_dim);
        let h = heads * d;
        let width = dims.layers * 2 * h;
        let n: usize = rows.iter().map(|r| r.len).sum();
        let mut out = vec![0f64; n * h];
        for r in rows {
            for head in 0..heads {
                let mut keys: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
                for j in 0..r.prefix_len {
                    let base = (r.prefix_start + j) * width;
                    let k = base + (2 * dims.layer * heads + head) * d;
                    let v = base + ((2 * dims.layer + 1) * heads + head) * d;
                    keys.push((
                        prefix[k..k + d].iter().map(|&x| x as f64).collect(),
                        prefix[v..v + d].iter().map(|&x| x as f64).collect(),
                    ));
                }
                for t in r.start..r.start + r.len {
                    let k = t * 3 * h + h + head * d;
                    keys.push((
                        qkv[k..k + d].iter().map(|&x| x as f64).collect(),
                        qkv[k + h..k + h + d].iter().map(|&x| x as f64).collect(),
                    ));
                }
                for t in r.start..r.start + r.len {
                    let q: Vec<f64> = qkv[t * 3 * h + head * d..][..d]
                        .iter()
                        .map(|&x| x as f64 * dims.scale as f64)
                        .collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|(k, _)| q.iter().zip(k).map(|(a, b)| a * b).sum())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for e in 0..d {
                        out[t * h + head * d + e] =
                            w.iter().zip(&keys).map(|(w, (_, v))| w * v[e]).sum::<f64>() / sum;
                    }
                }
            }
        }
        out
    }

    fn rows_of(lens: &[(usize, usize)]) -> (Vec<VarlenRow>, usize) {
        let (mut start, mut pstart) = (0, 0);
        let rows = lens
            .iter()
            .map(|&(len, plen)| {
                let r = VarlenRow {
                    start,
                    len,
                    prefix_start: pstart,
                    prefix_len: plen,
                };
                start += len;
                pstart += plen;
                r
            })
            .collect();
        (rows, pstart)
    }

    fn run(
        rows: &[VarlenRow],
        prefix_rows: usize,
        dims: VarlenDims,
        dtype: DType,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let dev = Device::Cpu;
        let h = dims.heads * dims.head_dim;
        let n: usize = rows.iter().map(|r| r.len).sum();
        let qkv = values(n * 3 * h, 1);
        let prefix = values(prefix_rows * dims.layers * 2 * h, 2);
        let idx = VarlenIndex::new(rows, prefix_rows).unwrap();
        let qt = Tensor::from_vec(qkv.clone(), (n, 3 * h), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let pt = Tensor::from_vec(prefix.clone(), (prefix_rows, dims.layers * 2 * h), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let it = Tensor::new(idx.values(), &dev).unwrap();
        let out = varlen_attention(&qt, &pt, &it, &idx, dims).unwrap();
        assert_eq!(out.dims(), &[n, h]);
        assert_eq!(out.dtype(), dtype);
        let out = out
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The reference sees the values the kernel saw (rounded to dtype).
        let rounded = |v: Vec<f32>| -> Vec<f32> {
            Tensor::new(v.as_slice(), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        (out, rounded(qkv), rounded(prefix))
    }

    fn dims(heads: usize, head_dim: usize, layers: usize, layer: usize) -> VarlenDims {
        VarlenDims {
            heads,
            head_dim,
            layers,
            layer,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Rows of different lengths (1 to 37 tokens), with and without deep
    /// prefixes of different lengths, in the second of three layers, at
    /// each head-size bound (and a head size below its bound).
    #[test]
    fn matches_an_f64_reference_over_ragged_rows_with_deep_prefixes() {
        let (rows, p) = rows_of(&[(5, 0), (1, 3), (37, 0), (12, 17), (2, 1), (9, 0)]);
        for (heads, d) in [(3, 32), (2, 20), (2, 64), (1, 128)] {
            let dims = dims(heads, d, 3, 1);
            let (out, qkv, prefix) = run(&rows, p, dims, DType::F32);
            let w = worst(&out, &reference(&qkv, &prefix, &rows, dims));
            assert!(w < 1e-5, "heads {heads} d {d}: worst {w}");
        }
    }

    /// f16 and bf16 inputs: the f32 arithmetic on the rounded inputs, with
    /// the output rounded once.
    #[test]
    fn sixteen_bit_inputs_are_computed_in_f32_and_rounded_once() {
        let (rows, p) = rows_of(&[(4, 2), (11, 0), (3, 5)]);
        let dims = dims(4, 32, 2, 0);
        for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
            let (out, qkv, prefix) = run(&rows, p, dims, dtype);
            let w = worst(&out, &reference(&qkv, &prefix, &rows, dims));
            assert!(w < tol, "{dtype:?}: worst {w}");
        }
    }

    /// The kernel must not let a row see another row's tokens: changing a
    /// row's keys changes only that row's outputs.
    #[test]
    fn rows_are_isolated() {
        let (rows, p) = rows_of(&[(6, 2), (6, 2)]);
        let dims = dims(2, 32, 1, 0);
        let dev = Device::Cpu;
        let h = 64;
        let idx = VarlenIndex::new(&rows, p).unwrap();
        let it = Tensor::new(idx.values(), &dev).unwrap();
        let prefix = Tensor::from_vec(values(p * 2 * h, 3), (p, 2 * h), &dev).unwrap();
        let a = values(12 * 3 * h, 4);
        let mut b = a.clone();
        for x in &mut b[6 * 3 * h..] {
            *x = -*x;
        }
        let go = |v: Vec<f32>| -> Vec<f32> {
            let q = Tensor::from_vec(v, (12, 3 * h), &dev).unwrap();
            varlen_attention(&q, &prefix, &it, &idx, dims)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (oa, ob) = (go(a), go(b));
        assert_eq!(oa[..6 * h], ob[..6 * h], "row 0 changed");
        assert_ne!(oa[6 * h..], ob[6 * h..], "row 1 unchanged");
    }

    #[test]
    fn index_refuses_rows_that_do_not_tile_or_prefixes_out_of_range() {
        let row = |start, len, ps, pl| VarlenRow {
            start,
            len,
            prefix_start: ps,
            prefix_len: pl,
        };
        assert_eq!(
            VarlenIndex::new(&[row(0, 2, 0, 0), row(3, 1, 0, 0)], 0).unwrap_err(),
            IndexError::NotTiled {
                row: 1,
                start: 3,
                expected: 2
            }
        );
        assert_eq!(
            VarlenIndex::new(&[row(0, 0, 0, 0)], 0).unwrap_err(),
            IndexError::EmptyRow(0)
        );
        assert_eq!(
            VarlenIndex::new(&[row(0, 2, 3, 2)], 4).unwrap_err(),
            IndexError::PrefixOutOfRange {
                row: 0,
                end: 5,
                rows: 4
            }
        );
        let ok = VarlenIndex::new(&[row(0, 2, 0, 0), row(2, 1, 1, 3)], 4).unwrap();
        assert_eq!(ok.values(), &[0, 0, 1, 0, 2, 0, 0, 2, 1, 1, 3]);
    }

    /// The op refuses tensors whose shapes differ from the index's sizes,
    /// and index values that do not match the checked ones.
    #[test]
    fn op_refuses_mismatched_tensors() {
        let dev = Device::Cpu;
        let (rows, p) = rows_of(&[(3, 1)]);
        let idx = VarlenIndex::new(&rows, p).unwrap();
        let d = dims(1, 32, 1, 0);
        let q = Tensor::zeros((3, 96), DType::F32, &dev).unwrap();
        let pre = Tensor::zeros((1, 64), DType::F32, &dev).unwrap();
        let it = Tensor::new(idx.values(), &dev).unwrap();
        assert!(varlen_attention(&q, &pre, &it, &idx, d).is_ok());
        let short = Tensor::zeros((2, 96), DType::F32, &dev).unwrap();
        let e = varlen_attention(&short, &pre, &it, &idx, d).unwrap_err();
        assert!(e.to_string().contains("qkv is [2, 96]"), "{e}");
        let mut bad = idx.values().to_vec();
        bad[0] = 7; // token 0 in a row that does not exist
        let bt = Tensor::new(bad.as_slice(), &dev).unwrap();
        let e = varlen_attention(&q, &pre, &bt, &idx, d).unwrap_err();
        assert!(e.to_string().contains("token 0 in row 7"), "{e}");
        let e = varlen_attention(&q, &pre, &it, &idx, dims(1, 32, 1, 1)).unwrap_err();
        assert!(e.to_string().contains("layer 1 of 1"), "{e}");
    }
}
