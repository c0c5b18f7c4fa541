// Self-attention over packed rows of different lengths, each row with its
// own task's deep prefix: the attention of the device backend
// (src/model/encoder/varlen.rs). No padded [batch, heads, seq, prefix+seq]
// grid: every query reads only its own row's keys.
//
// One source, two builds:
//   - nvcc --ptx (build.rs, feature `cuda`): one GPU thread per
//     (token, head), launched through candle's custom-op API;
//   - the host C++ compiler (build.rs, always; src/model/kernels/varlen_host.cpp):
//     the same per-thread function in a loop over every (block, thread), so
//     that the kernel's logic is tested on the CPU in CI, where there is no
//     GPU, against our own f64 reference and the candle-ops forward.
// The per-thread function touches no shared memory and needs no
// __syncthreads, which is what makes the host loop an exact emulation.
//
// Layouts (all row-major, T = float, __half or __nv_bfloat16):
//   qkv    [N, 3·hidden]  queries | keys | values of the packed tokens,
//                         biases already added, queries NOT yet scaled;
//   prefix [P, layers·2·hidden]  the batch's deep prompts one after another
//                         in PEFT's layout: column ((2·layer + kv)·heads + head)·d;
//   index  [N + 4·B] u32  token → row for each token, then per row
//                         (start, len, prefix_start, prefix_len);
//   out    [N, hidden]    merged heads' context.
// Softmax runs online (running max and sum) in f32 whatever T is.

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SP_FN __device__ __forceinline__
#define SP_UNROLL _Pragma("unroll")
#else
#include <math.h>
#include <stddef.h>
#define SP_FN static inline
#define SP_UNROLL
#endif

SP_FN float sp_load(const float *p) { return *p; }
SP_FN void sp_store(float *p, float v) { *p = v; }
#ifdef __CUDACC__
SP_FN float sp_load(const __half *p) { return __half2float(*p); }
SP_FN void sp_store(__half *p, float v) { *p = __float2half(v); }
SP_FN float sp_load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
SP_FN void sp_store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }
#define SP_EXP __expf
#else
#define SP_EXP expf
#endif

// Folds one key (dot product already scaled) and its value into the running
// softmax state (m: max so far, l: sum of exp(score - m), acc: weighted sum).
template <typename T, int D>
SP_FN void sp_fold(float score, const T *v, int d, float &m, float &l, float *acc) {
  float mn = score > m ? score : m;
  float c = SP_EXP(m - mn);  // 0 for the first key (m = -inf)
  float p = SP_EXP(score - mn);
  l = l * c + p;
  SP_UNROLL
  for (int e = 0; e < D; ++e) {
    if (e < d) acc[e] = acc[e] * c + p * sp_load(v + e);
  }
  m = mn;
}

// The work of thread `idx` of the launch: query token idx / heads, head
// idx % heads. D is a compile-time bound on the head size d (d <= D).
template <typename T, int D>
SP_FN void sp_varlen_attention_thread(size_t idx, const T *qkv, const T *prefix,
                                      const unsigned *index, T *out, unsigned n_tokens,
                                      unsigned heads, unsigned d, unsigned layers,
                                      unsigned layer, float scale) {
  if (idx >= (size_t)n_tokens * heads) return;
  const size_t t = idx / heads;
  const unsigned h = (unsigned)(idx % heads);
  const size_t hidden = (size_t)heads * d;
  const unsigned *row = index + n_tokens + 4 * (size_t)index[t];
  const size_t start = row[0], len = row[1], pstart = row[2], plen = row[3];

  float q[D], acc[D];
  const T *qp = qkv + t * 3 * hidden + h * d;
  SP_UNROLL
  for (int e = 0; e < D; ++e) {
    q[e] = e < (int)d ? sp_load(qp + e) * scale : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;

  // The row's deep prefix for this layer, then the row's own tokens.
  const size_t width = (size_t)layers * 2 * hidden;
  const size_t kcol = (2 * (size_t)layer * heads + h) * d;
  const size_t vcol = kcol + hidden;
  for (size_t j = 0; j < plen; ++j) {
    const T *kv = prefix + (pstart + j) * width;
    float s = 0.0f;
  SP_UNROLL
    for (int e = 0; e < D; ++e) {
      if (e < (int)d) s += q[e] * sp_load(kv + kcol + e);
    }
    sp_fold<T, D>(s, kv + vcol, (int)d, m, l, acc);
  }
  for (size_t j = start; j < start + len; ++j) {
    const T *k = qkv + j * 3 * hidden + hidden + h * d;
    float s = 0.0f;
  SP_UNROLL
    for (int e = 0; e < D; ++e) {
      if (e < (int)d) s += q[e] * sp_load(k + e);
    }
    sp_fold<T, D>(s, k + hidden, (int)d, m, l, acc);
  }
  // Every query sees at least itself, so l >= 1.
  T *o = out + t * hidden + h * d;
  const float inv = 1.0f / l;
  SP_UNROLL
  for (int e = 0; e < D; ++e) {
    if (e < (int)d) sp_store(o + e, acc[e] * inv);
  }
}

#ifdef __CUDACC__
// One kernel per element type and head-size bound; the Rust side picks the
// smallest bound >= d (src/model/kernels/varlen.rs, `kernel_name`).
#define SP_KERNEL(NAME, T, D)                                                      \
  extern "C" __global__ void NAME(const T *qkv, const T *prefix, const unsigned *index, \
                                  T *out, unsigned n_tokens, unsigned heads, unsigned d, \
                                  unsigned layers, unsigned layer, float scale) {        \
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;                    \
    sp_varlen_attention_thread<T, D>(idx, qkv, prefix, index, out, n_tokens, heads, d, \
                                     layers, layer, scale);                        \
  }
SP_KERNEL(sp_varlen_attention_f32_d32, float, 32)
SP_KERNEL(sp_varlen_attention_f32_d64, float, 64)
SP_KERNEL(sp_varlen_attention_f32_d128, float, 128)
SP_KERNEL(sp_varlen_attention_f16_d32, __half, 32)
SP_KERNEL(sp_varlen_attention_f16_d64, __half, 64)
SP_KERNEL(sp_varlen_attention_f16_d128, __half, 128)
SP_KERNEL(sp_varlen_attention_bf16_d32, __nv_bfloat16, 32)
SP_KERNEL(sp_varlen_attention_bf16_d64, __nv_bfloat16, 64)
SP_KERNEL(sp_varlen_attention_bf16_d128, __nv_bfloat16, 128)
#endif
