// reduce.cu — deterministic two-pass reductions and the on-device denominators
// of docs/api.md §2.3.
//
// Math. With per-measurement weights w and weighted losses L:
//   none / sum: divisor 1; mean: sum(w) (PyTorch's weighted mean, TF MEAN);
//   sum_over_batch_size: L.size; sum_by_nonzero_weights: count(w != 0);
//   batch_size: L.shape[0]. A divisor of 0 gives loss 0 and grad 0, never NaN.
// For class-index cross entropy w[n] = weight[n] * cw[y[n]] and 0 where
// y[n] == ignore_index (PyTorch CrossEntropyLoss; ignore_index=None ignores
// nothing, carried as has_ignore = 0, never as a sentinel target value); an
// out-of-range target (validate=False) keeps weight[n] (its loss is NaN
// anyway) and never reads cw.
//
// Why on the device: the gradient of a mean is scaled by 1/sum(w). Reading
// sum(w) on the host would be a synchronisation in the middle of every loss
// (Liger-Kernel's `.item()`); instead reduce_denominator writes
// scal = {denominator, 1/denominator or 0} to device memory and the fused loss
// kernels read scal[1].
//
// Determinism (docs/api.md §3.3): pass 1 gives every block a fixed, grid-strided slice
// and writes one float64 partial per block (no atomics); pass 2 is one block
// whose threads read the partials at fixed strides and reduce them with the
// fixed tree of gl::block_reduce. The grid is chosen from the shape only
// (gpuloss/backends/launch.py), so equal inputs give equal bits.
//
// Launch shape: pass 1 kernels take any 1-D grid with blockDim.x a multiple of
// 32; the *_finish and denominator kernels take one block. Partials are
// float64 whatever the input (the cross-block sum is tiny, and float64 there
// keeps 2^26-element means at float32 accuracy).
//
// Memory traffic: reduce_weights reads the weight values (and the int64
// targets for index cross entropy): 8-16 bytes per measurement; reduce_sum
// reads the per-row losses once; both are small beside the logits.
//
// Entry points:
//   reduce_weights_<a>(w_values, w_count, w_block, y, cw, classes, has_ignore,
//                      ignore_index, use_targets, n, partials[2 * gridDim.x])
//       w[i] = w_values[i / w_block] (one value: all i), times for use_targets
//       1: 0 where y[i] == ignore_index (only when has_ignore), 2: the same
//       and cw[y[i]];
//       partials[b] = sum of w over block b's slice, partials[G + b] = count(w != 0)
//   reduce_denominator_f64(partials, nparts, mode, constant, mult, scal[2])
//   reduce_sum_<a>(x, n, partials[gridDim.x])             sum of x in float64
//   reduce_finish_<a>(partials, nparts, scal, out[1])     out = total * scal[1] (0 if scal[0] == 0)
// with <a> in f32, f64 (the compute dtype).
#include "common.cuh"
#include "losses.cuh"

namespace {

using gl::index_t;

// Sum of partials[0, n) by one block, in a fixed order.
GPULOSS_DEVICE double sum_partials(const double* partials, index_t n) {
  __shared__ double scratch[gl::kMaxWarps];
  double acc = 0.0;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  return gl::block_reduce_sum(acc, scratch);
}

template <class A>
__device__ void reduce_weights(const A* w_values, index_t w_count, index_t w_block, const int64_t* y, const A* cw,
                               index_t classes, int has_ignore, int64_t ignore_index, int use_targets,
                               index_t n, double* partials) {
  __shared__ double scratch[gl::kMaxWarps];
  double sum = 0.0, nonzero = 0.0;
  for (index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) {
    double w = (double)gll::weight_at(w_values, w_count, w_block, i);
    if (use_targets) {
      const int64_t yi = y[i];
      if (has_ignore && yi == ignore_index) w = 0.0;
      else if (use_targets == 2 && yi >= 0 && yi < classes) w *= (double)cw[yi];
    }
    sum += w;
    nonzero += (w != 0.0) ? 1.0 : 0.0;
  }
  sum = gl::block_reduce_sum(sum, scratch);
  nonzero = gl::block_reduce_sum(nonzero, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
    partials[gridDim.x + blockIdx.x] = nonzero;
  }
}

template <class A>
__device__ void reduce_sum(const A* x, index_t n, double* partials) {
  __shared__ double scratch[gl::kMaxWarps];
  double acc = 0.0;
  for (index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) acc += (double)x[i];
  acc = gl::block_reduce_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <class A>
__device__ void reduce_finish(const double* partials, index_t nparts, const double* scal, A* out) {
  const double total = sum_partials(partials, nparts);
  // docs/api.md §2.3.2: a zero denominator gives 0 whatever the total (even NaN).
  if (threadIdx.x == 0) out[0] = (A)(scal[0] == 0.0 ? 0.0 : total * scal[1]);
}

}  // namespace

// `partials` holds nparts sums then nparts counts (reduce_weights' layout);
// mode picks which one (times mult) is the denominator, or `constant`.
extern "C" __global__ void reduce_denominator_f64(const double* partials, gl::index_t nparts, int mode,
                                                  double constant, double mult, double* scal) {
  double denom = constant;
  if (mode == gll::kDenomWeightSum) denom = sum_partials(partials, nparts) * mult;
  else if (mode == gll::kDenomNonzero) denom = sum_partials(partials + nparts, nparts) * mult;
  if (threadIdx.x == 0) {
    scal[0] = denom;
    scal[1] = denom == 0.0 ? 0.0 : 1.0 / denom;
  }
}
GPULOSS_REGISTER(reduce_denominator_f64)

#define GPULOSS_REDUCE_ENTRIES(sfx, A)                                                                         \
  extern "C" __global__ void reduce_weights_##sfx(const A* w_values, gl::index_t w_count, gl::index_t w_block, \
                                                  const int64_t* y, const A* cw, gl::index_t classes,         \
                                                  int has_ignore, int64_t ignore_index, int use_targets,      \
                                                  gl::index_t n, double* partials) {                          \
    reduce_weights<A>(w_values, w_count, w_block, y, cw, classes, has_ignore, ignore_index, use_targets, n,   \
                      partials);                                                                               \
  }                                                                                                            \
  GPULOSS_REGISTER(reduce_weights_##sfx)                                                                       \
  extern "C" __global__ void reduce_sum_##sfx(const A* x, gl::index_t n, double* partials) {                  \
    reduce_sum<A>(x, n, partials);                                                                             \
  }                                                                                                            \
  GPULOSS_REGISTER(reduce_sum_##sfx)                                                                           \
  extern "C" __global__ void reduce_finish_##sfx(const double* partials, gl::index_t nparts,                   \
                                                 const double* scal, A* out) {                                 \
    reduce_finish<A>(partials, nparts, scal, out);                                                             \
  }                                                                                                            \
  GPULOSS_REGISTER(reduce_finish_##sfx)

GPULOSS_FOR_EACH_ACC(GPULOSS_REDUCE_ENTRIES)
