// The host build of varlen_attention.cu (see its header): every thread of
// the GPU launch, run in order on the CPU. Only the CPU fallback of the
// device backend's attention (`--kernels device` on the CPU) and the
// kernel's tests call it; the CPU serving path has its own fused kernels.
#include "varlen_attention.cu"

template <int D>
static void sp_launch_host(const float *qkv, const float *prefix, const unsigned *index,
                           float *out, unsigned n_tokens, unsigned heads, unsigned d,
                           unsigned layers, unsigned layer, float scale, unsigned block_dim) {
  const size_t total = (size_t)n_tokens * heads;
  const size_t blocks = (total + block_dim - 1) / block_dim;
  for (size_t b = 0; b < blocks; ++b) {
    for (unsigned th = 0; th < block_dim; ++th) {
      sp_varlen_attention_thread<float, D>(b * block_dim + th, qkv, prefix, index, out,
                                           n_tokens, heads, d, layers, layer, scale);
    }
  }
}

// Returns 0, or 1 when d is over the largest bound (128): the caller checks
// d first, this is a second guard.
extern "C" int sp_varlen_attention_host_f32(const float *qkv, const float *prefix,
                                            const unsigned *index, float *out,
                                            unsigned n_tokens, unsigned heads, unsigned d,
                                            unsigned layers, unsigned layer, float scale,
                                            unsigned block_dim) {
  if (block_dim == 0) return 1;
  if (d <= 32) {
    sp_launch_host<32>(qkv, prefix, index, out, n_tokens, heads, d, layers, layer, scale, block_dim);
  } else if (d <= 64) {
    sp_launch_host<64>(qkv, prefix, index, out, n_tokens, heads, d, layers, layer, scale, block_dim);
  } else if (d <= 128) {
    sp_launch_host<128>(qkv, prefix, index, out, n_tokens, heads, d, layers, layer, scale, block_dim);
  } else {
    return 1;
  }
  return 0;
}
