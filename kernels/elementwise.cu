// elementwise.cu — the element-wise losses of docs/api.md §2.2 with their gradients,
// weighted_reduce, and cosine distance; pass 1 of their deterministic
// reductions.
//
// Math (d = x - t; twin of gpuloss/backends/cpu.py _elementwise_loss):
//   sigmoid CE   t' = t (1 - eps) + eps/2 (TF label smoothing);
//                l = max(x, 0) - x t' + log1p(e^-|x|),  dl/dx = sigmoid(x) - t';
//                with pos_weight p (PyTorch BCEWithLogitsLoss):
//                l = (1 - t') x + (1 + (p - 1) t') (log1p(e^-|x|) + max(-x, 0)),
//                dl/dx = (1 - t') + (1 + (p - 1) t') (sigmoid(x) - 1)
//   log_loss     -t log(x + eps) - (1 - t) log(1 - x + eps)       (TF log_loss)
//   mse          d^2;  abs |d| (grad sign(d), 0 at 0 as torch.l1_loss)
//   huber        d^2/2 if |d| <= delta else delta (|d| - delta/2)   (TF huber_loss)
//   smooth_l1    d^2/(2 beta) if |d| < beta else |d| - beta/2       (torch SmoothL1Loss)
//   hinge        y = 2t - 1, max(0, 1 - y x)                        (TF hinge_loss)
//   identity     l = x (weighted_reduce)
//   cosine       l[n] = 1 - sum_k p[n,k] t[n,k], dl/dp = -t           (TF cosine_distance)
// Per element: L = w l with w = values[i / block] (docs/api.md §2.3.1); grad =
// w dl/dx / denominator, the divisor written on the device by reduce.cu in the
// launch before (mean, sum_by_nonzero_weights) or passed by value (gll::Denom),
// so no host round trip sits between the launches.
//
// Launch shape: elementwise_fwd_bwd: 1-D grid, blockDim.x a multiple of 32,
// each thread a grid-strided set of elements, summed in float64; one float64 partial of sum(L)
// per block, which the last block adds (gll::finish_reduced). cosine_fwd_bwd: `group` lanes per
// measurement n = o*inner + i, reading p[o, :, i] at stride `inner`: with the
// axis last (inner == 1) a group of up to 32 lanes reads a row together and
// adds its dot product by shuffles; with inner > 1 one thread per measurement,
// so that a warp reads consecutive i (coalesced).
//
// Memory traffic: read x and t, write grad (and L for reduction "none"):
// 12 bytes per float32 element for fwd+bwd, 8 for the forward only. At
// 2^26 elements that is 0.8 GB: bandwidth-bound, ~0.3 ms at 3 TB/s.
//
// Entry points (<p> in f32, f64, f16, bf16, f16_f32, bf16_f32: input storage,
// then target storage when it differs):
//   elementwise_fwd_bwd_<p>(x, t, n, kind, param, w_values, w_count, w_block,
//       pos_weight, pw_period, scal, denom_const, denom_on_device, loss_out,
//       want_loss, grad, want_grad, partials, want_total, ticket, out)
//   cosine_fwd_bwd_<p>(p, t, rows, length, inner, w_values, w_count, w_block,
//       scal, denom_const, denom_on_device, loss_rows, want_rows, grad, want_grad,
//       group, partials, want_total, ticket, out)
// with partials[2 * gridDim.x] and the one-element ticket counter of
// gll::finish_reduced; out = {reduced loss, unused}.
#include "common.cuh"
#include "losses.cuh"

namespace {

using gl::index_t;

// Returns this thread's float64 partial of sum(L): each weighted loss is formed
// in the accumulation type, but the running sum is float64, so a long
// grid-strided slice loses no digits to float32 rounding.
template <int KIND, class T, class P>
__device__ double elementwise_loop(const T* x, const P* t, index_t n, gl::acc_t<T> param,
                                         const gl::acc_t<T>* w_values, index_t w_count, index_t w_block,
                                         const gl::acc_t<T>* pos_weight, index_t pw_period, gl::acc_t<T> inv,
                                         gl::acc_t<T>* loss_out, int want_loss, T* grad, int want_grad) {
  typedef gl::acc_t<T> A;
  double acc = 0.0;
  for (index_t i = gl::global_thread_id(); i < n; i += gl::grid_stride()) {
    const A xi = gl::load_as_acc(x, i);
    const A ti = KIND == gll::kIdentity ? xi : (A)gl::load_as_acc(t, i);
    const A p = pw_period > 0 ? pos_weight[gll::mod_index(i, pw_period)] : A(1);
    const A w = gll::weight_at(w_values, w_count, w_block, i);
    A l, dl;
    gll::elementwise_loss<KIND>(xi, ti, param, p, l, dl);
    const A wl = w * l;
    acc += (double)wl;
    if (want_loss) loss_out[i] = wl;
    if (want_grad) gl::store_from_acc(grad, i, (inv * w) * dl);
  }
  return acc;
}

template <class T, class P>
__device__ void elementwise_fwd_bwd(const T* x, const P* t, index_t n, int kind, gl::acc_t<T> param,
                                    const gl::acc_t<T>* w_values, index_t w_count, index_t w_block,
                                    const gl::acc_t<T>* pos_weight, index_t pw_period, const gll::Denom& denom,
                                    gl::acc_t<T>* loss_out, int want_loss, T* grad, int want_grad,
                                    double* partials, int want_total, unsigned int* ticket, gl::acc_t<T>* out) {
  typedef gl::acc_t<T> A;
  const A inv = (A)denom.inverse();
  double acc = 0.0;
  // One loop per loss: the switch runs once per thread, not once per element.
#define GPULOSS_EW_CASE(K)                                                                                   \
  case K:                                                                                                    \
    acc = elementwise_loop<K>(x, t, n, param, w_values, w_count, w_block, pos_weight, pw_period, inv,       \
                              loss_out, want_loss, grad, want_grad);                                        \
    break;
  switch (kind) {
    GPULOSS_EW_CASE(gll::kIdentity)
    GPULOSS_EW_CASE(gll::kSigmoidXent)
    GPULOSS_EW_CASE(gll::kLogLoss)
    GPULOSS_EW_CASE(gll::kSquared)
    GPULOSS_EW_CASE(gll::kAbsolute)
    GPULOSS_EW_CASE(gll::kHuber)
    GPULOSS_EW_CASE(gll::kSmoothL1)
    GPULOSS_EW_CASE(gll::kHinge)
    default:
      acc = gl::quiet_nan<double>();  // an unknown kind is a launcher bug: make it loud
  }
#undef GPULOSS_EW_CASE
  if (want_total) gll::finish_reduced(acc, 0.0, partials, ticket, denom, out);
}

// `group` lanes (a power of two <= 32) share a measurement; group == 1 is one
// thread per measurement. The loop is warp-uniform (every lane of a warp runs
// the same iterations), so the group shuffles always see their whole warp.
template <class T, class P>
__device__ void cosine_fwd_bwd(const T* p, const P* t, index_t rows, index_t length, index_t inner,
                               const gl::acc_t<T>* w_values, index_t w_count, index_t w_block,
                               const gll::Denom& denom, gl::acc_t<T>* loss_rows, int want_rows, T* grad,
                               int want_grad, int group, double* partials, int want_total, unsigned int* ticket,
                               gl::acc_t<T>* out) {
  typedef gl::acc_t<T> A;
  const A inv = (A)denom.inverse();
  double acc = 0.0;  // this thread's float64 share of sum(L) (rank 0 of each group)
  const index_t per_warp = gl::kWarpSize / group;
  const int rank = gl::lane_id() & (group - 1);
  const index_t warp = gl::global_thread_id() / gl::kWarpSize;
  const index_t warps = gl::grid_stride() / gl::kWarpSize;
  for (index_t first = warp * per_warp; first < rows; first += warps * per_warp) {
    const index_t n = first + gl::lane_id() / group;
    const bool active = n < rows;
    const index_t o = active ? n / inner : 0, i = active ? n - o * inner : 0;
    const index_t base = o * length * inner + i;
    A dot = A(0);
    if (active) {
      for (index_t k = rank; k < length; k += group) {
        dot += gl::load_as_acc(p, base + k * inner) * (A)gl::load_as_acc(t, base + k * inner);
      }
    }
    dot = gl::warp_reduce_sum(dot, group);
    if (!active) continue;
    const A w = gll::weight_at(w_values, w_count, w_block, n);
    if (rank == 0) {
      const A l = w * (A(1) - dot);
      if (want_rows) loss_rows[n] = l;
      acc += (double)l;
    }
    if (want_grad) {
      const A g = -(inv * w);
      for (index_t k = rank; k < length; k += group) {
        gl::store_from_acc(grad, base + k * inner, g * (A)gl::load_as_acc(t, base + k * inner));
      }
    }
  }
  if (want_total) gll::finish_reduced(acc, 0.0, partials, ticket, denom, out);
}

}  // namespace

#define GPULOSS_ELEMENTWISE_ENTRIES(sfx, T, P)                                                                  \
  extern "C" __global__ void elementwise_fwd_bwd_##sfx(                                                         \
      const T* x, const P* t, gl::index_t n, int kind, gl::acc_t<T> param, const gl::acc_t<T>* w_values,        \
      gl::index_t w_count, gl::index_t w_block, const gl::acc_t<T>* pos_weight, gl::index_t pw_period,          \
      const double* scal, double denom_const, int denom_on_device, gl::acc_t<T>* loss_out, int want_loss,       \
      T* grad, int want_grad, double* partials, int want_total, unsigned int* ticket, gl::acc_t<T>* out) {      \
    elementwise_fwd_bwd<T, P>(x, t, n, kind, param, w_values, w_count, w_block, pos_weight, pw_period,          \
                              gll::Denom{scal, denom_const, denom_on_device}, loss_out, want_loss, grad,        \
                              want_grad, partials, want_total, ticket, out);                                    \
  }                                                                                                             \
  GPULOSS_REGISTER(elementwise_fwd_bwd_##sfx)                                                                   \
  extern "C" __global__ void cosine_fwd_bwd_##sfx(                                                              \
      const T* p, const P* t, gl::index_t rows, gl::index_t length, gl::index_t inner,                          \
      const gl::acc_t<T>* w_values, gl::index_t w_count, gl::index_t w_block, const double* scal,               \
      double denom_const, int denom_on_device, gl::acc_t<T>* loss_rows, int want_rows, T* grad, int want_grad,  \
      int group, double* partials, int want_total, unsigned int* ticket, gl::acc_t<T>* out) {                   \
    cosine_fwd_bwd<T, P>(p, t, rows, length, inner, w_values, w_count, w_block,                                 \
                         gll::Denom{scal, denom_const, denom_on_device}, loss_rows, want_rows, grad, want_grad,  \
                         group, partials, want_total, ticket, out);                                             \
  }                                                                                                             \
  GPULOSS_REGISTER(cosine_fwd_bwd_##sfx)

GPULOSS_FOR_EACH_PAIR(GPULOSS_ELEMENTWISE_ENTRIES)
