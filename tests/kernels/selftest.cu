// selftest.cu — small kernels that exercise common.cuh, one template each,
// stamped for f32 / f64 / f16 / bf16. They serve as the fixture of
// tests/test_nvrtc.py (every entry point must compile with NVRTC for sm_70,
// sm_80 and sm_90 without spills) and as known-answer kernels for the
// emulated and CUDA backends:
//
//   selftest_roundtrip_<t>(in, out, as_float, n)
//       as_float[i] = float(in[i]); out[i] = in[i] through acc_t<T>
//       (bitwise identity for every non-NaN value).
//   selftest_from_double_<t>(in, out, n)
//       out[i] = in[i] rounded once, double -> T, to nearest even.
//   selftest_row_reduce_<t>(x, out, rows, cols)
//       one block per row (grid-strided): out[3*r + 0] = sum, + 1 = max
//       (NaN-propagating), + 2 = logsumexp by online softmax; accumulated in
//       acc_t<T>. blockDim.x a multiple of 32.
//   selftest_convert_check(f, n, mismatches)
//       on a GPU: counts where the cvt-instruction conversions differ from
//       the bit paths, over all 65536 half patterns and the n floats f.
//       Zero is the contract (common.cuh, "NaN convention").
#include "common.cuh"

namespace {

template <class T>
__device__ void roundtrip(const T* in, T* out, float* as_float, gl::index_t n) {
  for (gl::index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) {
    as_float[i] = gl::load_as_float(in, i);
    gl::store_from_acc(out, i, gl::load_as_acc(in, i));
  }
}

template <class T>
__device__ void from_double(const double* in, T* out, gl::index_t n) {
  for (gl::index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) {
    gl::store_from_double(out, i, in[i]);
  }
}

template <class T>
__device__ void row_reduce(const T* x, gl::acc_t<T>* out, gl::index_t rows, gl::index_t cols) {
  typedef gl::acc_t<T> A;
  // One scratch per kind: block_reduce syncs before returning, so they could
  // share, but separate arrays keep this kernel a plain example.
  __shared__ A sum_scratch[gl::kMaxWarps];
  __shared__ A max_scratch[gl::kMaxWarps];
  __shared__ gl::SoftmaxState<A> softmax_scratch[gl::kMaxWarps];
  for (gl::index_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;  // 64-bit: row * cols can pass 2^31
    A sum = A(0);
    A mx = gl::neg_inf<A>();
    gl::SoftmaxState<A> st = gl::softmax_empty<A>();
    for (gl::index_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const A v = gl::load_as_acc(xr, c);
      sum += v;
      mx = gl::max_nan(mx, v);
      gl::softmax_update(st, v);
    }
    sum = gl::block_reduce_sum(sum, sum_scratch);
    mx = gl::block_reduce_max(mx, max_scratch);
    st = gl::block_reduce_softmax(st, softmax_scratch);
    if (threadIdx.x == 0) {
      out[3 * row + 0] = sum;
      out[3 * row + 1] = mx;
      out[3 * row + 2] = gl::softmax_logsumexp(st);
    }
  }
}

}  // namespace

#define GPULOSS_SELFTEST_ENTRIES(sfx, T)                                                                \
  extern "C" __global__ void selftest_roundtrip_##sfx(const T* in, T* out, float* as_float,            \
                                                      gl::index_t n) {                                  \
    roundtrip<T>(in, out, as_float, n);                                                                 \
  }                                                                                                     \
  GPULOSS_REGISTER(selftest_roundtrip_##sfx);                                                          \
  extern "C" __global__ void selftest_from_double_##sfx(const double* in, T* out, gl::index_t n) {     \
    from_double<T>(in, out, n);                                                                         \
  }                                                                                                     \
  GPULOSS_REGISTER(selftest_from_double_##sfx);                                                        \
  extern "C" __global__ void selftest_row_reduce_##sfx(const T* x, gl::acc_t<T>* out, gl::index_t rows, \
                                                       gl::index_t cols) {                              \
    row_reduce<T>(x, out, rows, cols);                                                                  \
  }                                                                                                     \
  GPULOSS_REGISTER(selftest_row_reduce_##sfx);

GPULOSS_FOR_EACH_STORAGE(GPULOSS_SELFTEST_ENTRIES)

extern "C" __global__ void selftest_convert_check(const float* f, gl::index_t n, unsigned int* mismatches) {
  unsigned int bad = 0;
  for (gl::index_t i = gl::global_thread_id(); i < 65536; i += gl::grid_stride()) {
    const uint16_t h = (uint16_t)i;
    bad += gl::float_to_bits(gl::half_bits_to_float(h)) != gl::float_to_bits(gl::half_bits_to_float_soft(h));
  }
  for (gl::index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) {
    bad += gl::float_to_half_bits(f[i]) != gl::float_to_half_bits_soft(f[i]);
    bad += gl::float_to_bf16_bits(f[i]) != gl::float_to_bf16_bits_soft(f[i]);
  }
  if (bad) atomicAdd(mismatches, bad);  // integer atomics: exact, order-free
}
GPULOSS_REGISTER(selftest_convert_check);
