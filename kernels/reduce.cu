// reduce.cu — the on-device denominators of docs/api.md §2.3, in one launch.
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
// (Liger-Kernel's `.item()`); instead reduce_weights writes
// scal = {denominator, 1/denominator or 0} to device memory and the fused loss
// kernel of the next launch reads it (gll::Denom). Only mean and
// sum_by_nonzero_weights need it: every other divisor is a number of the shape,
// passed to the loss kernel by value, and then this launch does not happen.
//
// Determinism (docs/api.md §3.3): every block sums a fixed, grid-strided slice
// into one float64 partial (sum and non-zero count); the last block to finish
// (gl::last_block_done: a ticket counter, reset to 0 by that block) adds the
// partials in a fixed order. The grid is chosen from the shape only
// (gpuloss/backends/launch.py), so equal inputs give equal bits, whichever
// block finishes last.
//
// Launch shape: any 1-D grid with blockDim.x a multiple of 32. Partials are
// float64 whatever the input (float64 there keeps 2^26-element sums exact
// enough for float32 means).
//
// Memory traffic: the weight values (and the int32/int64 targets for index
// cross entropy): 8-16 bytes per measurement, small beside the logits.
//
// Entry points (<a> in f32, f64: the compute dtype of the weights):
//   reduce_weights_<a>(w_values, w_count, w_block, y, y_bytes, cw, classes, has_ignore,
//                      ignore_index, use_targets, n, mode, mult, partials[2 * gridDim.x],
//                      ticket, scal[2])
//       w[i] = w_values[i / w_block] (one value: all i), times for use_targets
//       1: 0 where y[i] == ignore_index (only when has_ignore), 2: the same
//       and cw[y[i]]; y holds int32 (y_bytes 4) or int64 (8) class indices;
//       scal = {D, 1/D or 0} with D = mult * sum(w) (mode kDenomWeightSum) or
//       mult * count(w != 0) (kDenomNonzero).
#include "common.cuh"
#include "losses.cuh"

namespace {

using gl::index_t;

template <class A>
__device__ void reduce_weights(const A* w_values, index_t w_count, index_t w_block, const void* y, int y_bytes,
                               const A* cw, index_t classes, int has_ignore, int64_t ignore_index, int use_targets,
                               index_t n, int mode, double mult, double* partials, unsigned int* ticket,
                               double* scal) {
  __shared__ double scratch[gl::kMaxWarps];
  double sum = 0.0, nonzero = 0.0;
  for (index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) {
    const double w = gll::divisor_weight(w_values, w_count, w_block, y, y_bytes, cw, classes, has_ignore,
                                         ignore_index, use_targets, i);
    sum += w;
    nonzero += (w != 0.0) ? 1.0 : 0.0;
  }
  sum = gl::block_reduce_sum(sum, scratch);
  nonzero = gl::block_reduce_sum(nonzero, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
    partials[gridDim.x + blockIdx.x] = nonzero;
  }
  if (!gl::last_block_done(ticket)) return;
  const double total = gl::block_sum_partials(partials + (mode == gll::kDenomNonzero ? gridDim.x : 0), gridDim.x);
  if (threadIdx.x == 0) {
    const double denom = total * mult;
    scal[0] = denom;
    scal[1] = denom == 0.0 ? 0.0 : 1.0 / denom;
  }
  gl::release_ticket(ticket);
}

}  // namespace

#define GPULOSS_REDUCE_ENTRIES(sfx, A)                                                                         \
  extern "C" __global__ void reduce_weights_##sfx(                                                             \
      const A* w_values, gl::index_t w_count, gl::index_t w_block, const void* y, int y_bytes, const A* cw,    \
      gl::index_t classes, int has_ignore, int64_t ignore_index, int use_targets, gl::index_t n, int mode,     \
      double mult, double* partials, unsigned int* ticket, double* scal) {                                     \
    reduce_weights<A>(w_values, w_count, w_block, y, y_bytes, cw, classes, has_ignore, ignore_index,           \
                      use_targets, n, mode, mult, partials, ticket, scal);                                     \
  }                                                                                                            \
  GPULOSS_REGISTER(reduce_weights_##sfx)

GPULOSS_FOR_EACH_ACC(GPULOSS_REDUCE_ENTRIES)
