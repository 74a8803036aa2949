// xent.cu — fused softmax cross entropy, forward and backward in one launch
// (docs/api.md §2.1); twin of gpuloss/backends/cpu.py _xent_index_kernel / _xent_prob_kernel.
//
// Math. For a row x of C logits, m = max_c x_c and s = sum_c exp(x_c - m)
// come from one online pass (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax", arXiv 1805.02867, Algorithm 3: the running max is
// updated and the running sum rescaled by exp(m_old - m_new)); partial states
// of the threads are merged with the same rule (gl::softmax_combine). Then
//   -logp_c = (m - x_c) + log(s)        never x_c - logsumexp: at |x| ~ 1e4
//                                       that difference of two large numbers
//                                       would lose the digits of log(s)
//   -logp_y = log1p(rest) when x_y == m, rest = sum_{c != y} exp(x_c - m)
//                                       kept beside s in the online pass: a
//                                       confident row's tiny loss stays exact
//                                       (1 + 1e-9 is 1 in float32)
//   p_c     = exp((x_c - m) - log(s))
// Index targets y (PyTorch CrossEntropyLoss with weight, ignore_index and
// label_smoothing eps; cw = class weights):
//   l  = (1-eps) cw_y (-logp_y) + eps/C sum_c cw_c (-logp_c)
//   dl/dx_j = (1-eps) cw_y (p_j - [j=y]) + eps/C (sum(cw) p_j - cw_j),
//   with p_y - 1 = -rest / s (no cancellation when p_y is close to 1)
//   y == ignore_index: l = 0, grad 0; y outside [0, C) (validate=False): l and
//   the row's grad NaN, and x[y] is never read.
// Probability targets t (t' = (1-eps) t + eps/C, wt_c = cw_c t'_c):
//   l = sum_c wt_c (-logp_c),   dl/dx_j = p_j sum_c wt_c - wt_j.
// Extras (both off at 0): softcap s replaces every logit by s * tanh(x / s)
// before anything else (Gemma 2's final-logit soft-capping), and the gradient
// of each class is multiplied by d/dx = 1 - tanh^2(x / s); z_loss c adds
// c * lse^2 per measurement (PaLM, Chowdhery et al. 2022, section 5), lse the
// log-sum-exp of the (capped) row, weighted and ignored like the CE term
// (index targets: by weight[n] * cw_y), with gradient 2 c lse p_j.
// Loss row n is weight[n] * l (+ the z term); grad = weight[n] * dl/dx /
// denominator, the divisor read from scal = {D, 1/D} written by reduce.cu's
// reduce_weights in the launch before, or passed by value when it is a number
// of the shape (gll::Denom). Reduced results: each thread adds its rows'
// losses (and z terms) in float64, each block writes one partial, and the
// last block to finish adds the partials in a fixed order and writes
// out = {loss, z term} (gll::finish_reduced): one launch, no reduce pass. A NaN
// logit makes m and s NaN, so the row's loss and every grad entry of that row
// are NaN; so does a +inf logit or a row of -inf (every class masked).
//
// Launch shapes (chosen from C by gpuloss/backends/launch.py). Measurement
// n = o * inner + i has its classes at o*C*inner + c*inner + i; every variant
// takes any `inner`, so a class axis that is not last gets the same per-thread
// sums (and the same accuracy) as a last one:
//   xent_fwd_bwd_<p>          C large: one row per block (grid-strided over
//                             rows), block reductions.
//   xent_warp_fwd_bwd_<p>     C small: a warp holds 32/group rows, `group`
//                             (a power of two <= 32) lanes each, reductions
//                             by shuffles only.
//   xent_strided_fwd_bwd_<p>  C tiny and the class axis not last: one thread
//                             per measurement; the threads of a warp read
//                             consecutive i, so each class step is a
//                             coalesced load.
//   xent_cached_fwd_bwd_<p>   as xent_fwd_bwd, for contiguous rows of at most
//                             48 KiB: the row is copied to dynamic shared
//                             memory first and every pass reads it there.
//   xent_split_stats_<p>,     fewer than 264 rows of C > 1024: each row split
//   xent_split_fwd_bwd_<p>    over several blocks, two launches (see below).
// Contiguous rows are read with 16-byte vector loads after a scalar head up to
// the first 16-byte boundary (any row alignment works, including offset views).
//
// Memory traffic. Pass 1 reads the row (online max and sum); pass 2 reads it
// again and writes the gradient. A row of at most 48 KiB is read from DRAM
// once into shared memory (xent_cached_fwd_bwd); for longer rows the second
// read hits L2 (a 128256-class float32 row is 0.5 MB; the rows in flight fit
// in H100's 50 MB L2), so DRAM sees read x + write grad = 8 bytes per float32
// logit, 4 per bf16: the bound to reach is ~85% of the copy bandwidth.
//
// Entry points, <p> in f32, f64, f16, bf16, f16_f32, bf16_f32 (logits
// storage, then the probability-target storage when it differs), all with
// the parameters of XENT_PARAMS below (`group` for the warp variant only).
#include "common.cuh"
#include "losses.cuh"

namespace {

using gl::index_t;

template <class T, class P>
struct XentArgs {
  typedef gl::acc_t<T> A;
  const T* x;
  index_t rows, C, inner;
  const void* y;     // index targets, one per measurement: int32 (y_bytes 4) or int64 (8)
  int y_bytes;
  const P* t;        // probability targets, the layout of x
  int index_target;
  const A* w_values;
  index_t w_count, w_block;
  const A* cw;  // class weights, or unused when has_cw == 0 (all ones)
  int has_cw;
  int has_ignore;  // 0: no target value is ignored (ignore_index=None), whatever ignore_index holds
  int64_t ignore_index;
  A eps;
  A z_loss;            // c of the z term c * lse^2 (PaLM, Chowdhery et al. 2022, section 5); 0: off
  A softcap;           // s of x -> s * tanh(x / s) (Gemma 2 final-logit soft-capping); 0: off
  gll::Denom denom;     // the reduction's divisor; the gradient is scaled by its inverse
  A* loss_rows;         // weight[n] * l[n] (the z term included), when want_rows
  A* z_rows;            // weight[n] * cw[y] * c * lse^2 alone, when want_rows and want_z
  int want_z;
  int want_rows;        // reduction "none": write the per-row losses
  T* grad;
  int want_grad;
  int want_total;       // reduced: per-block partials, and the last block writes out
  double* partials;     // 2 * gridDim.x float64 (gll::finish_reduced)
  unsigned int* ticket;  // the launch's "last block done" counter, 0 on entry and on exit
  A* out;               // {loss, z term}, reduced
  int cache_row;        // block variant, contiguous rows: keep the row in dynamic shared memory

  GPULOSS_DEVICE A class_weight(index_t c) const { return has_cw ? cw[c] : A(1); }
  // The logit the softmax sees: capped when softcap is on (a +-inf logit becomes +-s).
  GPULOSS_DEVICE A cap(A v) const { return softcap != A(0) ? softcap * gl::tanh(v / softcap) : v; }
  // d cap(v) / dv = 1 - tanh^2(v / s), from the capped value vc.
  GPULOSS_DEVICE A cap_slope(A vc) const {
    if (softcap == A(0)) return A(1);
    const A r = vc / softcap;
    return A(1) - r * r;
  }
  // Measurement n's classes sit at base + c * stride of x (logits [outer, C, inner]).
  GPULOSS_DEVICE index_t base(index_t n) const {
    if (inner == 1) return n * C;
    const index_t o = n / inner;
    return o * C * inner + (n - o * inner);
  }
};

// Who cooperates on one row: a whole block, `width` lanes of a warp, or one thread.
struct BlockGroup {
  enum { kCached = 0 };
  GPULOSS_DEVICE int rank() const { return (int)threadIdx.x; }
  GPULOSS_DEVICE int size() const { return (int)blockDim.x; }
  template <class A> GPULOSS_DEVICE A sum(A v) const {
    __shared__ A scratch[gl::kMaxWarps];
    return gl::block_reduce_sum(v, scratch);
  }
  template <class A> GPULOSS_DEVICE gl::SoftmaxState<A> softmax(gl::SoftmaxState<A> st) const {
    __shared__ gl::SoftmaxState<A> scratch[gl::kMaxWarps];
    return gl::block_reduce_softmax(st, scratch);
  }
};

// A block whose row sits in shared memory (the launch's cache_row): a type of
// its own, so the row pointer of the passes is known to be shared memory at
// compile time (ld.shared, no generic loads) and the uncached kernel is unchanged.
struct CachedBlockGroup : BlockGroup {
  enum { kCached = 1 };
};

struct WarpGroup {
  enum { kCached = 0 };
  int width;
  GPULOSS_DEVICE int rank() const { return gl::lane_id() & (width - 1); }
  GPULOSS_DEVICE int size() const { return width; }
  template <class A> GPULOSS_DEVICE A sum(A v) const { return gl::warp_reduce_sum(v, width); }
  template <class A> GPULOSS_DEVICE gl::SoftmaxState<A> softmax(gl::SoftmaxState<A> st) const {
    return gl::warp_reduce_softmax(st, width);
  }
};

struct SoloGroup {
  enum { kCached = 0 };
  GPULOSS_DEVICE int rank() const { return 0; }
  GPULOSS_DEVICE int size() const { return 1; }
  template <class V> GPULOSS_DEVICE V sum(V v) const { return v; }
  template <class A> GPULOSS_DEVICE gl::SoftmaxState<A> softmax(gl::SoftmaxState<A> st) const { return st; }
};

// One measurement n whose classes sit at base + c * stride. Every member of
// the group calls this with the same n (and `active`: false for the padding
// lanes of a warp past the last row, which still take part in the shuffles).
// Reductions are called unconditionally, under conditions uniform across the
// launch, so no barrier or shuffle is ever skipped by part of a group.
// Adds the row's weighted loss and z term to acc_l / acc_z on the member of
// rank 0 (the launch's float64 partial sums when the result is reduced).
template <class T, class P, class G>
__device__ void xent_row(const XentArgs<T, P>& a, const G& grp, index_t n, bool active, double& acc_l,
                         double& acc_z) {
  typedef gl::acc_t<T> A;
  const index_t C = a.C;
  const index_t stride = a.inner;
  const index_t base = active ? a.base(n) : 0;
  const int rank = grp.rank(), size = grp.size();
  const T* xr = a.x + base;
  T* gr = a.grad + base;
  const P* tr = a.t + base;
  const A one = A(1);
  const A eps = a.eps;
  const A uniform = eps / (A)C;

  int64_t yn = 0;
  bool ignored = false, invalid = false;
  if (a.index_target && active) {
    yn = gll::class_index(a.y, a.y_bytes, n);
    ignored = a.has_ignore && yn == a.ignore_index;
    invalid = !ignored && (yn < 0 || yn >= C);
  }
  const bool live = active && !ignored && !invalid;
  const bool smoothing = a.index_target && eps != A(0);

  // A row the launch marked cache_row (one row per block, contiguous, at most
  // 48 KiB) is first copied to shared memory, and every pass reads it there:
  // the logits come from DRAM once, not once per pass.
  const T* xr2 = xr;  // where the passes read the row
  if constexpr (G::kCached) {
    GPULOSS_DYNAMIC_SHARED(T, smem);
    T* cache = smem + gll::row_copy_shift(xr);
    if (live) gll::copy_row(xr, C, rank, size, cache);
    __syncthreads();
    xr2 = cache;
  }

  // Pass 1: online (max, sum); for index targets also rest = sum_{c != y}
  // exp(x_c - max) under the same running max; for probability targets
  // mass = sum_c wt_c; for smoothed index targets with class weights sum_c cw_c.
  gl::SoftmaxState<A> st = gl::softmax_empty<A>();
  A extra = A(0), rest = A(0);
  if (live) {
    if (!a.index_target) {
      auto f = [&](index_t c, A v) {
        gl::softmax_update(st, a.cap(v));
        extra += a.class_weight(c) * ((one - eps) * (A)gl::load_as_acc(tr, c * stride) + uniform);
      };
      gll::visit_row(xr2, C, stride, rank, size, f);
    } else {
      const bool sum_cw = smoothing && a.has_cw;
      auto f = [&](index_t c, A v) {
        gl::softmax_update_rest(st, rest, a.cap(v), c != yn);
        if (sum_cw) extra += a.cw[c];
      };
      gll::visit_row(xr2, C, stride, rank, size, f);
    }
  }
  const A m_local = st.max;
  st = grp.softmax(st);
  // A +inf logit gives +inf - logsumexp = inf - inf, and a row of -inf (every
  // class masked, or C = 1 with -inf) gives -inf - -inf: both rows are NaN, as
  // in gpuloss.reference, the cpu backend and PyTorch's log_softmax. Without
  // this, the x_y == m test below would take the log1p branch for an all
  // -inf row and return log(C).
  if (st.max == gl::pos_inf<A>() || st.max == gl::neg_inf<A>()) st.max = st.sum = gl::quiet_nan<A>();
  const A m = st.max;
  const A log_s = gl::log(st.sum);
  const A lse = m + log_s;  // of the (capped) logits
  if (a.index_target) rest = grp.sum(rest * gl::softmax_scale(m_local, m));
  if (!a.index_target || (smoothing && a.has_cw)) extra = grp.sum(extra);
  else extra = (A)C;  // sum of unit class weights
  const A w = active ? gll::weight_at(a.w_values, a.w_count, a.w_block, n) : A(0);
  const A g = (A)a.denom.inverse() * w;
  const A z_coef = A(2) * a.z_loss * lse;  // d (c lse^2) / d x'_j = 2 c lse p_j

  if (a.index_target) {
    const A cw_y = live ? a.class_weight(yn) : A(0);
    const A coef_y = g * (one - eps) * cw_y;
    const A coef_s = g * uniform;
    const A coef_z = g * cw_y * z_coef;
    const A coef_p = coef_y + coef_s * extra + coef_z;
    A smooth = A(0);
    if (a.want_grad || smoothing) {
      if (live) {
        if (a.want_grad) {
          gll::map_row(xr2, gr, C, stride, rank, size, [&](index_t c, A v) {
            const A vc = a.cap(v);
            const A p = gl::exp((vc - m) - log_s);
            const A cwc = a.class_weight(c);
            if (smoothing) smooth += cwc * ((m - vc) + log_s);
            if (c != yn) return (coef_p * p - coef_s * cwc) * a.cap_slope(vc);
            // coef_y (p_y - 1) = -coef_y rest / s: no cancellation when p_y is close to 1.
            return (-coef_y * rest / st.sum + (coef_s * extra + coef_z) * p - coef_s * cwc) * a.cap_slope(vc);
          });
        } else {
          gll::visit_row(xr2, C, stride, rank, size,
                         [&](index_t c, A v) { smooth += a.class_weight(c) * ((m - a.cap(v)) + log_s); });
        }
      } else if (active && a.want_grad) {
        gll::fill_row(gr, C, stride, rank, size, ignored ? A(0) : gl::quiet_nan<A>());
      }
      if (smoothing) smooth = grp.sum(smooth);
    }
    if (active && rank == 0) {
      A l, z;
      if (ignored) {
        l = z = A(0);
      } else if (invalid) {
        l = z = gl::quiet_nan<A>();
      } else {
        const A x_y = a.cap(gl::load_as_acc(xr2, yn * stride));
        // -logp_y = (m - x_y) + log s; when y holds the max, s = 1 + rest and
        // log1p(rest) keeps a tiny loss (a confident row) exact.
        const A nll = x_y == m ? gl::log1p(rest) : (m - x_y) + log_s;
        l = (one - eps) * cw_y * nll;
        if (smoothing) l += uniform * smooth;
        z = a.z_loss != A(0) ? w * cw_y * a.z_loss * lse * lse : A(0);
        l = w * l + z;
      }
      if (a.want_rows) {
        a.loss_rows[n] = l;
        if (a.want_z) a.z_rows[n] = z;
      }
      acc_l += (double)l;
      acc_z += (double)z;
    }
  } else {
    const A mass = extra;
    A loss = A(0);
    if (active) {
      if (a.want_grad) {
        gll::map_row(xr2, gr, C, stride, rank, size, [&](index_t c, A v) {
          const A vc = a.cap(v);
          const A wt = a.class_weight(c) * ((one - eps) * (A)gl::load_as_acc(tr, c * stride) + uniform);
          loss += wt * ((m - vc) + log_s);
          const A p = gl::exp((vc - m) - log_s);
          return g * (p * (mass + z_coef) - wt) * a.cap_slope(vc);
        });
      } else {
        gll::visit_row(xr2, C, stride, rank, size, [&](index_t c, A v) {
          const A wt = a.class_weight(c) * ((one - eps) * (A)gl::load_as_acc(tr, c * stride) + uniform);
          loss += wt * ((m - a.cap(v)) + log_s);
        });
      }
    }
    loss = grp.sum(loss);
    if (active && rank == 0) {
      const A z = a.z_loss != A(0) ? w * a.z_loss * lse * lse : A(0);
      const A l = w * loss + z;
      if (a.want_rows) {
        a.loss_rows[n] = l;
        if (a.want_z) a.z_rows[n] = z;
      }
      acc_l += (double)l;
      acc_z += (double)z;
    }
  }
  // The next row of this block overwrites the cache, split between the threads
  // by its own alignment: every thread must be done reading this one.
  if constexpr (G::kCached) __syncthreads();
}

// The launch's end: nothing more for reduction "none"; else the reduced loss
// and z term by the last block (gll::finish_reduced). The condition is uniform.
template <class T, class P>
__device__ void xent_finish(const XentArgs<T, P>& a, double acc_l, double acc_z) {
  if (a.want_total) gll::finish_reduced(acc_l, acc_z, a.partials, a.ticket, a.denom, a.out);
}

// G: BlockGroup, or CachedBlockGroup (xent_cached_fwd_bwd: the row in shared memory).
template <class G, class T, class P>
__device__ void xent_block(const XentArgs<T, P>& a) {
  const G grp;
  double acc_l = 0.0, acc_z = 0.0;
  for (index_t n = blockIdx.x; n < a.rows; n += gridDim.x) xent_row(a, grp, n, true, acc_l, acc_z);
  xent_finish(a, acc_l, acc_z);
}

template <class T, class P>
__device__ void xent_warp(const XentArgs<T, P>& a, int group) {
  const WarpGroup grp{group};
  const index_t rows_per_warp = gl::kWarpSize / group;
  const index_t warp = gl::global_thread_id() / gl::kWarpSize;
  const index_t warps = gl::grid_stride() / gl::kWarpSize;
  double acc_l = 0.0, acc_z = 0.0;
  // `first` is the same for every lane of the warp: the loop is warp-uniform.
  for (index_t first = warp * rows_per_warp; first < a.rows; first += warps * rows_per_warp) {
    const index_t n = first + gl::lane_id() / group;
    xent_row(a, grp, n, n < a.rows, acc_l, acc_z);
  }
  xent_finish(a, acc_l, acc_z);
}

template <class T, class P>
__device__ void xent_strided(const XentArgs<T, P>& a) {
  const SoloGroup grp;
  double acc_l = 0.0, acc_z = 0.0;
  for (index_t n = gl::global_thread_id(); n < a.rows; n += gl::grid_stride()) xent_row(a, grp, n, true, acc_l, acc_z);
  xent_finish(a, acc_l, acc_z);
}

// ---------------------------------------------------------------------------
// Few rows, many classes (launch.py's "split" variant: fewer rows than about two
// waves of blocks): row n is cut into `splits` slices of `slice` classes (the
// last one shorter), one block each, block b = n * splits + j. Two launches:
//   xent_split_stats    each block's online state of its slice,
//                       stats[4 b ..] = {max, sum, rest, extra} (rest and extra
//                       as in xent_row, relative to the slice's max); block 0
//                       also writes the divisor scal when it depends on the
//                       weights (fewer than SPLIT_MAX_ROWS rows: one block reads
//                       them all), so no reduce_weights launch is needed.
//   xent_split_fwd_bwd  every block combines its row's `splits` states in index
//                       order with gl::softmax_combine (Milakov & Gimelshein
//                       2018: the same associative operator as within a block),
//                       so all blocks of a row hold bit-identical (m, s, rest),
//                       then writes its slice's gradient and its share of the
//                       row's loss (partials[b], z terms at partials[R + b],
//                       R = rows * splits); the last block (gl::last_block_done)
//                       adds each row's shares in slice order (reduction "none")
//                       or all of them (reduced).
// The formulas are xent_row's, term for term.

template <class T, class P>
struct SplitRow {
  index_t n, c0, len;  // row, first class of this block's slice, its length
  int64_t yn;
  bool ignored, invalid, live;
  GPULOSS_DEVICE SplitRow(const XentArgs<T, P>& a, index_t splits, index_t slice) {
    const index_t b = blockIdx.x;
    n = b / splits;
    c0 = (b - n * splits) * slice;
    len = a.C - c0 < slice ? a.C - c0 : slice;
    yn = 0;
    ignored = invalid = false;
    if (a.index_target) {
      yn = gll::class_index(a.y, a.y_bytes, n);
      ignored = a.has_ignore && yn == a.ignore_index;
      invalid = !ignored && (yn < 0 || yn >= a.C);
    }
    live = !ignored && !invalid;
  }
};

template <class T, class P>
__device__ void xent_split_stats(const XentArgs<T, P>& a, index_t splits, index_t slice, gl::acc_t<T>* stats,
                                 int denom_mode, double denom_mult) {
  typedef gl::acc_t<T> A;
  const BlockGroup grp;
  const SplitRow<T, P> r(a, splits, slice);
  const index_t stride = a.inner;
  const T* xs = a.x + a.base(r.n) + r.c0 * stride;
  const P* ts = a.t + a.base(r.n) + r.c0 * stride;
  const A one = A(1), eps = a.eps, uniform = eps / (A)a.C;
  gl::SoftmaxState<A> st = gl::softmax_empty<A>();
  A extra = A(0), rest = A(0);
  if (r.live) {
    if (!a.index_target) {
      gll::visit_row(xs, r.len, stride, grp.rank(), grp.size(), [&](index_t c, A v) {
        gl::softmax_update(st, a.cap(v));
        extra += a.class_weight(r.c0 + c) * ((one - eps) * (A)gl::load_as_acc(ts, c * stride) + uniform);
      });
    } else {
      const bool sum_cw = eps != A(0) && a.has_cw;
      gll::visit_row(xs, r.len, stride, grp.rank(), grp.size(), [&](index_t c, A v) {
        gl::softmax_update_rest(st, rest, a.cap(v), r.c0 + c != r.yn);
        if (sum_cw) extra += a.cw[r.c0 + c];
      });
    }
  }
  const A m_local = st.max;
  st = grp.softmax(st);
  rest = grp.sum(rest * gl::softmax_scale(m_local, st.max));
  extra = grp.sum(extra);
  if (threadIdx.x == 0) {
    A* out = stats + 4 * (index_t)blockIdx.x;
    out[0] = st.max;
    out[1] = st.sum;
    out[2] = rest;
    out[3] = extra;
  }
  if (blockIdx.x == 0 && denom_mode != gll::kDenomConstant) {
    const int use_targets = a.index_target ? (a.has_cw ? 2 : 1) : 0;
    const index_t count = a.index_target ? a.rows : a.w_count;
    const index_t block = a.index_target ? a.w_block : 1;
    double sum = 0.0, nonzero = 0.0;
    for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
      const double w = gll::divisor_weight(a.w_values, a.w_count, block, a.y, a.y_bytes, a.cw, a.C,
                                           a.has_ignore, a.ignore_index, use_targets, i);
      sum += w;
      nonzero += (w != 0.0) ? 1.0 : 0.0;
    }
    sum = grp.sum(sum);
    nonzero = grp.sum(nonzero);
    if (threadIdx.x == 0) {
      // XENT_PARAMS carries scal as the loss kernels' input; this launch is the one that writes it.
      double* scal = const_cast<double*>(a.denom.scal);
      const double d = (denom_mode == gll::kDenomNonzero ? nonzero : sum) * denom_mult;
      scal[0] = d;
      scal[1] = d == 0.0 ? 0.0 : 1.0 / d;
    }
  }
}

template <class T, class P>
__device__ void xent_split_fwd_bwd(const XentArgs<T, P>& a, index_t splits, index_t slice,
                                   const gl::acc_t<T>* stats) {
  typedef gl::acc_t<T> A;
  const BlockGroup grp;
  const SplitRow<T, P> r(a, splits, slice);
  const index_t C = a.C, stride = a.inner;
  const int rank = grp.rank(), size = grp.size();
  const T* xs = a.x + a.base(r.n) + r.c0 * stride;
  T* gs = a.grad + a.base(r.n) + r.c0 * stride;
  const P* ts = a.t + a.base(r.n) + r.c0 * stride;
  const A one = A(1), eps = a.eps, uniform = eps / (A)C;
  const bool smoothing = a.index_target && eps != A(0);

  // The row's state from its slices, in slice order: the same bits in every block of the row.
  const A* row = stats + 4 * r.n * splits;
  gl::SoftmaxState<A> st = gl::softmax_empty<A>();
  for (index_t k = 0; k < splits; ++k) st = gl::softmax_combine(st, gl::SoftmaxState<A>{row[4 * k], row[4 * k + 1]});
  A rest = A(0), extra = A(0);
  for (index_t k = 0; k < splits; ++k) {
    rest += row[4 * k + 2] * gl::softmax_scale(row[4 * k], st.max);
    extra += row[4 * k + 3];
  }
  // +inf logit or a row of -inf: NaN, as in xent_row.
  if (st.max == gl::pos_inf<A>() || st.max == gl::neg_inf<A>()) st.max = st.sum = gl::quiet_nan<A>();
  const A m = st.max;
  const A log_s = gl::log(st.sum);
  const A lse = m + log_s;
  if (a.index_target && !(smoothing && a.has_cw)) extra = (A)C;
  const A w = gll::weight_at(a.w_values, a.w_count, a.w_block, r.n);
  const A g = (A)a.denom.inverse() * w;
  const A z_coef = A(2) * a.z_loss * lse;
  const bool first = r.c0 == 0;  // the block that adds the row's own terms (nll, z)
  A share = A(0), z = A(0);      // this block's part of the row's loss and z term (thread 0)

  if (a.index_target) {
    const A cw_y = r.live ? a.class_weight(r.yn) : A(0);
    const A coef_y = g * (one - eps) * cw_y;
    const A coef_s = g * uniform;
    const A coef_z = g * cw_y * z_coef;
    const A coef_p = coef_y + coef_s * extra + coef_z;
    A smooth = A(0);
    if (r.live && a.want_grad) {
      gll::map_row(xs, gs, r.len, stride, rank, size, [&](index_t c, A v) {
        const A vc = a.cap(v);
        const A p = gl::exp((vc - m) - log_s);
        const A cwc = a.class_weight(r.c0 + c);
        if (smoothing) smooth += cwc * ((m - vc) + log_s);
        if (r.c0 + c != r.yn) return (coef_p * p - coef_s * cwc) * a.cap_slope(vc);
        return (-coef_y * rest / st.sum + (coef_s * extra + coef_z) * p - coef_s * cwc) * a.cap_slope(vc);
      });
    } else if (r.live && smoothing) {
      gll::visit_row(xs, r.len, stride, rank, size,
                     [&](index_t c, A v) { smooth += a.class_weight(r.c0 + c) * ((m - a.cap(v)) + log_s); });
    } else if (!r.live && a.want_grad) {
      gll::fill_row(gs, r.len, stride, rank, size, r.ignored ? A(0) : gl::quiet_nan<A>());
    }
    if (smoothing) smooth = grp.sum(smooth);
    if (rank == 0) {
      if (r.ignored) {
        share = z = A(0);
      } else if (r.invalid) {
        share = z = first ? gl::quiet_nan<A>() : A(0);
      } else {
        share = w * (uniform * smooth);
        if (first) {
          const A x_y = a.cap(gl::load_as_acc(a.x + a.base(r.n), r.yn * stride));
          const A nll = x_y == m ? gl::log1p(rest) : (m - x_y) + log_s;
          z = a.z_loss != A(0) ? w * cw_y * a.z_loss * lse * lse : A(0);
          share += w * ((one - eps) * cw_y * nll) + z;
        }
      }
    }
  } else {
    const A mass = extra;
    A loss = A(0);
    if (a.want_grad) {
      gll::map_row(xs, gs, r.len, stride, rank, size, [&](index_t c, A v) {
        const A vc = a.cap(v);
        const A wt = a.class_weight(r.c0 + c) * ((one - eps) * (A)gl::load_as_acc(ts, c * stride) + uniform);
        loss += wt * ((m - vc) + log_s);
        const A p = gl::exp((vc - m) - log_s);
        return g * (p * (mass + z_coef) - wt) * a.cap_slope(vc);
      });
    } else {
      gll::visit_row(xs, r.len, stride, rank, size, [&](index_t c, A v) {
        const A wt = a.class_weight(r.c0 + c) * ((one - eps) * (A)gl::load_as_acc(ts, c * stride) + uniform);
        loss += wt * ((m - a.cap(v)) + log_s);
      });
    }
    loss = grp.sum(loss);
    if (rank == 0) {
      z = first && a.z_loss != A(0) ? w * a.z_loss * lse * lse : A(0);
      share = w * loss + z;
    }
  }

  // Every block's share, then the last block adds them (rows < SPLIT_MAX_ROWS: one block suffices).
  const index_t R = a.rows * splits;
  if (rank == 0) {
    a.partials[blockIdx.x] = (double)share;
    a.partials[R + blockIdx.x] = (double)z;
  }
  if (!gl::last_block_done(a.ticket)) return;
  const volatile double* parts = a.partials;
  if (a.want_rows) {
    for (index_t n = threadIdx.x; n < a.rows; n += blockDim.x) {
      double l = 0.0, zn = 0.0;
      for (index_t k = 0; k < splits; ++k) {
        l += parts[n * splits + k];
        zn += parts[R + n * splits + k];
      }
      a.loss_rows[n] = (A)l;
      if (a.want_z) a.z_rows[n] = (A)zn;
    }
  }
  if (a.want_total) {
    const double lt = gl::block_sum_partials(a.partials, R);
    const double zt = gl::block_sum_partials(a.partials + R, R);
    if (threadIdx.x == 0) {
      const double den = a.denom.value(), inv = a.denom.inverse();
      a.out[0] = (A)(den == 0.0 ? 0.0 : lt * inv);
      a.out[1] = (A)(den == 0.0 ? 0.0 : zt * inv);
    }
  }
  gl::release_ticket(a.ticket);
}

}  // namespace

#define XENT_PARAMS(T, P)                                                                                    \
  const T *x, gl::index_t rows, gl::index_t classes, gl::index_t inner, const void *y, int y_bytes, const P *t, \
      int index_target, const gl::acc_t<T> *w_values, gl::index_t w_count, gl::index_t w_block,              \
      const gl::acc_t<T> *cw, int has_cw, int has_ignore, int64_t ignore_index, gl::acc_t<T> eps,            \
      gl::acc_t<T> z_loss, gl::acc_t<T> softcap, const double *scal, double denom_const, int denom_on_device, \
      gl::acc_t<T> *loss_rows, gl::acc_t<T> *z_rows, int want_z, int want_rows, T *grad, int want_grad,      \
      int want_total, double *partials, unsigned int *ticket, gl::acc_t<T> *out, int cache_row
#define XENT_ARGS(T, P)                                                                                       \
  XentArgs<T, P> a{x,          rows,      classes,   inner,        y,        y_bytes,  t,                      \
                   index_target, w_values, w_count,  w_block,      cw,       has_cw,   has_ignore,             \
                   ignore_index, eps,      z_loss,   softcap,      gll::Denom{scal, denom_const, denom_on_device}, \
                   loss_rows,  z_rows,    want_z,    want_rows,    grad,     want_grad, want_total,            \
                   partials,   ticket,    out,          cache_row}

// The row kernels get at most 512 threads (launch.py). __launch_bounds__(512, 2)
// holds the uncached one to 64 registers for 16/32-bit storage without spills,
// so two 512-thread blocks share an SM (unbounded it takes ~66-70 at sm_90);
// float64 rows (~92 registers) would spill under it and keep one block. The
// cached kernel needs more registers than 64 for 16-bit storage: its bound is
// one 512-thread block (its 48 KiB of shared memory allows at most 4 anyway).
// Before sm_80, bfloat16 is rounded in software (no cvt.rn.bf16.f32): it spills
// under 64 registers there, so it keeps one block too.
template <class T> struct RowMinBlocks { enum { value = 2 }; };
template <> struct RowMinBlocks<double> { enum { value = 1 }; };
#if GPULOSS_DEVICE_CODE && __CUDA_ARCH__ < 800
template <> struct RowMinBlocks<gl::bf16_t> { enum { value = 1 }; };
#endif
#define GPULOSS_ROW_MIN_BLOCKS(T) RowMinBlocks<T>::value
#define GPULOSS_XENT_ENTRIES(sfx, T, P)                                                                 \
  extern "C" __global__ void __launch_bounds__(512, GPULOSS_ROW_MIN_BLOCKS(T))                         \
      xent_fwd_bwd_##sfx(XENT_PARAMS(T, P)) {                                                           \
    XENT_ARGS(T, P);                                                                                    \
    xent_block<BlockGroup>(a);                                                                          \
  }                                                                                                     \
  GPULOSS_REGISTER(xent_fwd_bwd_##sfx)                                                                  \
  extern "C" __global__ void __launch_bounds__(512, 1) xent_cached_fwd_bwd_##sfx(XENT_PARAMS(T, P)) {   \
    XENT_ARGS(T, P);                                                                                    \
    xent_block<CachedBlockGroup>(a);                                                                    \
  }                                                                                                     \
  GPULOSS_REGISTER(xent_cached_fwd_bwd_##sfx)                                                           \
  extern "C" __global__ void xent_warp_fwd_bwd_##sfx(XENT_PARAMS(T, P), int group) {                    \
    XENT_ARGS(T, P);                                                                                    \
    xent_warp(a, group);                                                                                \
  }                                                                                                     \
  GPULOSS_REGISTER(xent_warp_fwd_bwd_##sfx)                                                             \
  extern "C" __global__ void xent_strided_fwd_bwd_##sfx(XENT_PARAMS(T, P)) {                            \
    XENT_ARGS(T, P);                                                                                    \
    xent_strided(a);                                                                                    \
  }                                                                                                     \
  GPULOSS_REGISTER(xent_strided_fwd_bwd_##sfx)                                                          \
  extern "C" __global__ void xent_split_stats_##sfx(XENT_PARAMS(T, P), gl::index_t splits, gl::index_t slice, \
                                                    gl::acc_t<T>* stats, int denom_mode, double denom_mult) { \
    XENT_ARGS(T, P);                                                                                    \
    xent_split_stats(a, splits, slice, stats, denom_mode, denom_mult);                                  \
  }                                                                                                     \
  GPULOSS_REGISTER(xent_split_stats_##sfx)                                                              \
  extern "C" __global__ void xent_split_fwd_bwd_##sfx(XENT_PARAMS(T, P), gl::index_t splits, gl::index_t slice, \
                                                      gl::acc_t<T>* stats, int denom_mode, double denom_mult) { \
    XENT_ARGS(T, P);                                                                                    \
    xent_split_fwd_bwd(a, splits, slice, stats);                                                        \
  }                                                                                                     \
  GPULOSS_REGISTER(xent_split_fwd_bwd_##sfx)

GPULOSS_FOR_EACH_PAIR(GPULOSS_XENT_ENTRIES)
