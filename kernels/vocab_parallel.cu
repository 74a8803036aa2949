// vocab_parallel.cu — vocabulary-parallel softmax cross entropy: the two
// per-shard passes around the collectives (docs/distributed.md); twin of
// gpuloss/backends/cpu_vocab.py.
//
// Scheme: Megatron-LM's vocabulary-parallel cross entropy (Shoeybi et al.
// 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using
// Model Parallelism", arXiv 1909.08053, §3). Rank r holds the logits of the
// contiguous classes [start, start + V) of every row; per row only a few
// numbers cross the network:
//
//   vp_stats_<p>   one pass over the shard (online max/sum, Milakov &
//                  Gimelshein 2018, as xent.cu), per row:
//                    m_r    = max_c x'_c                       -> all-reduce MAX
//                    rest_r = sum_{c != y} exp(x'_c - m_r)    \  rescaled to the global m
//                    xy_r   = x'_y if y is in the shard, else 0 } by the host, then one
//                    gap_r  = sum_c cw_c (m_r - x'_c)          /  all-reduce SUM
//                  (gap only with label smoothing: packed width 3, else 2),
//                  x' = s tanh(x / s) with softcap s. Ignored rows: m = -inf, zeros.
//   vp_finish_<p>  one pass over the shard after the collectives: the loss of
//                  every row (identical on every rank) and the gradient of the
//                  shard's classes:
//                    s = rest + exp(xy - m), log s, lse = m + log s
//                    -logp_y = (m - xy) + log s, or log1p(rest) when xy == m
//                    l = (1-eps) cw_y (-logp_y) + eps/C (gap + sum(cw) log s)
//                    row loss = w l + w cw_y z lse^2
//                    grad_c = scal[1] w [(a + b sum(cw) + zc) p_c - b cw_c - a [c == y]] cap'(x_c)
//                      a = (1-eps) cw_y, b = eps/C, zc = 2 z cw_y lse,
//                      and a (p_y - 1) written as -a rest / s (no cancellation).
//                  An invalid target (validate=False), a +inf logit or a row of
//                  -inf gives a NaN row, as xent.cu.
//
// Both are one row per block, grid-strided over rows (threads chosen from V by
// gpuloss/backends/launch_vocab.py). Class weights `cw` are the whole [C]
// vector on every rank (the target's weight may live on another shard);
// sum(cw) and 1/denominator are read from device memory (`sums`, `scal`), so
// the host never waits for the device.
//
// Entry points, <p> in f32, f64, f16, bf16 (logits storage; the statistics,
// weights and losses are in acc_t: float, or double for f64).
#include "common.cuh"
#include "losses.cuh"

namespace {

using gl::index_t;

template <class A> GPULOSS_DEVICE A vp_cap(A v, A softcap) { return softcap != A(0) ? softcap * gl::tanh(v / softcap) : v; }

template <class A> GPULOSS_DEVICE A vp_cap_slope(A vc, A softcap) {
  if (softcap == A(0)) return A(1);
  const A r = vc / softcap;
  return A(1) - r * r;
}

template <class A> GPULOSS_DEVICE A vp_block_sum(A v) {
  __shared__ A scratch[gl::kMaxWarps];
  return gl::block_reduce_sum(v, scratch);
}

template <class A> GPULOSS_DEVICE gl::SoftmaxState<A> vp_block_softmax(gl::SoftmaxState<A> st) {
  __shared__ gl::SoftmaxState<A> scratch[gl::kMaxWarps];
  return gl::block_reduce_softmax(st, scratch);
}

template <class T>
__device__ void vp_stats(const T* x, index_t rows, index_t V, index_t start, const int64_t* y,
                         const gl::acc_t<T>* cw, int has_cw, int has_ignore, int64_t ignore_index, int want_gap,
                         gl::acc_t<T> softcap, gl::acc_t<T>* m_out, gl::acc_t<T>* packed, int width) {
  typedef gl::acc_t<T> A;
  const int rank = (int)threadIdx.x, size = (int)blockDim.x;
  for (index_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const int64_t yn = y[n];
    A* out = packed + n * (index_t)width;
    if (has_ignore && yn == ignore_index) {  // uniform over the block: no barrier is skipped by part of it
      if (rank == 0) {
        m_out[n] = gl::neg_inf<A>();
        for (int k = 0; k < width; ++k) out[k] = A(0);
      }
      continue;
    }
    const index_t skip = (yn >= start && yn < start + V) ? (index_t)(yn - start) : (index_t)-1;
    const T* xr = x + n * V;
    gl::SoftmaxState<A> st = gl::softmax_empty<A>();
    A rest = A(0);
    gll::visit_row(xr, V, 1, rank, size,
                   [&](index_t c, A v) { gl::softmax_update_rest(st, rest, vp_cap(v, softcap), c != skip); });
    const A m_thread = st.max;
    st = vp_block_softmax(st);
    const A m = st.max;
    rest = vp_block_sum(rest * gl::softmax_scale(m_thread, m));
    A gap = A(0);
    if (want_gap) {
      gll::visit_row(xr, V, 1, rank, size, [&](index_t c, A v) {
        const A vc = vp_cap(v, softcap);
        if (vc != m) gap += (has_cw ? cw[start + c] : A(1)) * (m - vc);  // -inf under a -inf max adds nothing
      });
      gap = vp_block_sum(gap);
    }
    if (rank == 0) {
      m_out[n] = m;
      out[0] = rest;
      out[1] = skip >= 0 ? vp_cap(gl::load_as_acc(xr, skip), softcap) : A(0);
      if (want_gap) out[2] = gap;
    }
  }
}

template <class T>
__device__ void vp_finish(const T* x, index_t rows, index_t V, index_t start, index_t classes, const int64_t* y,
                          const gl::acc_t<T>* w_values, index_t w_count, index_t w_block, const gl::acc_t<T>* cw,
                          int has_cw, const double* sums, int has_ignore, int64_t ignore_index, gl::acc_t<T> eps,
                          gl::acc_t<T> z_loss, gl::acc_t<T> softcap, const gl::acc_t<T>* m_in,
                          const gl::acc_t<T>* packed, int width, const double* scal, gl::acc_t<T>* loss_rows,
                          gl::acc_t<T>* z_rows, int want_z, T* grad, int want_grad) {
  typedef gl::acc_t<T> A;
  const int rank = (int)threadIdx.x, size = (int)blockDim.x;
  const A one = A(1);
  const A uniform = eps / (A)classes;
  const A cw_total = has_cw ? (A)sums[0] : (A)classes;
  for (index_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const int64_t yn = y[n];
    const T* xr = x + n * V;
    T* gr = grad + n * V;
    if (has_ignore && yn == ignore_index) {
      if (want_grad) gll::fill_row(gr, V, 1, rank, size, A(0));
      if (rank == 0) {
        loss_rows[n] = A(0);
        if (want_z) z_rows[n] = A(0);
      }
      continue;
    }
    const A* in = packed + n * (index_t)width;
    const bool invalid = yn < 0 || yn >= classes;
    A m = m_in[n];
    const A rest = in[0], xy = in[1];
    if (invalid || m == gl::pos_inf<A>() || m == gl::neg_inf<A>()) m = gl::quiet_nan<A>();
    const A s = rest + gl::exp(xy - m);
    const A log_s = gl::log(s);
    const A lse = m + log_s;
    const A cw_y = invalid ? gl::quiet_nan<A>() : (has_cw ? cw[yn] : one);
    const A w = gll::weight_at(w_values, w_count, w_block, n);
    if (want_grad) {
      const A g = (A)scal[1] * w;
      const A a = g * (one - eps) * cw_y;
      const A b = g * uniform;
      const A zc = g * cw_y * A(2) * z_loss * lse;
      const A coef = a + b * cw_total + zc;
      const index_t local_y = invalid ? (index_t)-1 : (index_t)(yn - start);
      gll::map_row(xr, gr, V, 1, rank, size, [&](index_t c, A v) {
        const A vc = vp_cap(v, softcap);
        const A p = gl::exp((vc - m) - log_s);
        const A cwc = has_cw ? cw[start + c] : one;
        if (c != local_y) return (coef * p - b * cwc) * vp_cap_slope(vc, softcap);
        return (-a * rest / s + (b * cw_total + zc) * p - b * cwc) * vp_cap_slope(vc, softcap);
      });
    }
    if (rank == 0) {
      const A nll = xy == m ? gl::log1p(rest) : (m - xy) + log_s;
      A l = (one - eps) * cw_y * nll;
      if (eps != A(0)) l += uniform * ((width > 2 ? in[2] : A(0)) + cw_total * log_s);
      const A z = z_loss != A(0) ? w * cw_y * z_loss * lse * lse : A(0);
      loss_rows[n] = w * l + z;
      if (want_z) z_rows[n] = z;
    }
  }
}

}  // namespace

#define VP_STATS_PARAMS(T)                                                                                 \
  const T *x, gl::index_t rows, gl::index_t V, gl::index_t start, const int64_t *y, const gl::acc_t<T> *cw, \
      int has_cw, int has_ignore, int64_t ignore_index, int want_gap, gl::acc_t<T> softcap,                 \
      gl::acc_t<T> *m_out, gl::acc_t<T> *packed, int width
#define VP_FINISH_PARAMS(T)                                                                                 \
  const T *x, gl::index_t rows, gl::index_t V, gl::index_t start, gl::index_t classes, const int64_t *y,   \
      const gl::acc_t<T> *w_values, gl::index_t w_count, gl::index_t w_block, const gl::acc_t<T> *cw,      \
      int has_cw, const double *sums, int has_ignore, int64_t ignore_index, gl::acc_t<T> eps,              \
      gl::acc_t<T> z_loss, gl::acc_t<T> softcap, const gl::acc_t<T> *m_in, const gl::acc_t<T> *packed,    \
      int width, const double *scal, gl::acc_t<T> *loss_rows, gl::acc_t<T> *z_rows, int want_z, T *grad,  \
      int want_grad

#define GPULOSS_VP_ENTRIES(sfx, T)                                                                          \
  extern "C" __global__ void vp_stats_##sfx(VP_STATS_PARAMS(T)) {                                          \
    vp_stats<T>(x, rows, V, start, y, cw, has_cw, has_ignore, ignore_index, want_gap, softcap, m_out,      \
                packed, width);                                                                            \
  }                                                                                                         \
  GPULOSS_REGISTER(vp_stats_##sfx)                                                                          \
  extern "C" __global__ void vp_finish_##sfx(VP_FINISH_PARAMS(T)) {                                        \
    vp_finish<T>(x, rows, V, start, classes, y, w_values, w_count, w_block, cw, has_cw, sums, has_ignore,  \
                 ignore_index, eps, z_loss, softcap, m_in, packed, width, scal, loss_rows, z_rows, want_z, \
                 grad, want_grad);                                                                         \
  }                                                                                                         \
  GPULOSS_REGISTER(vp_finish_##sfx)

GPULOSS_FOR_EACH_STORAGE(GPULOSS_VP_ENTRIES)
