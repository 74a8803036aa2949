// losses.cuh — device code shared by xent.cu, elementwise.cu and reduce.cu.
//
//   * GPULOSS_FOR_EACH_PAIR(X)   stamps X(suffix, T, P) for the (input storage T,
//                                second-operand storage P) pairs the launcher
//                                dispatches on: P == T, or P == acc_t<T> when the
//                                target came in another dtype (host casts it to
//                                the compute dtype, as the cpu backend does)
//   * weight_at                   the (values, block) weight layout of docs/api.md §2.3.1:
//                                element i has weight values[i / block]
//   * elementwise_loss<KIND>      (loss, d loss / dx) of one element, docs/api.md §2.2;
//                                the twin of gpuloss/backends/cpu.py _elementwise_loss
//   * Pack16 / row visitors       16-byte vector loads and stores over one row,
//                                with a scalar head and tail for any alignment
//
// Everything here is NVRTC-clean (no toolkit headers) and builds under the
// emulator's g++ as well; see common.cuh for the conventions.
#ifndef GPULOSS_LOSSES_CUH
#define GPULOSS_LOSSES_CUH

#include "common.cuh"

// (suffix, input storage T, target storage P). The 16-bit inputs get a second
// entry whose targets are float32: a float64 or integer target is cast by the
// host to the compute dtype, never to 16 bits (that would lose digits the
// float64 reference keeps).
#define GPULOSS_FOR_EACH_PAIR(X)                                                      \
  X(f32, float, float) X(f64, double, double) X(f16, gl::f16_t, gl::f16_t)            \
  X(bf16, gl::bf16_t, gl::bf16_t) X(f16_f32, gl::f16_t, float) X(bf16_f32, gl::bf16_t, float)

// The accumulation types only (reduce.cu's passes run on loss/weight values,
// which the host already holds in the compute dtype).
#define GPULOSS_FOR_EACH_ACC(X) X(f32, float) X(f64, double)

namespace gll {

using gl::index_t;

// Element-wise loss ids; gpuloss/backends/launch.py ELEMENTWISE_KIND and
// gpuloss/backends/cpu.py _KIND use the same numbers.
enum : int {
  kIdentity = 0,
  kSigmoidXent = 1,
  kLogLoss = 2,
  kSquared = 3,
  kAbsolute = 4,
  kHuber = 5,
  kSmoothL1 = 6,
  kHinge = 7,
};

// Reduction modes of the denominator (docs/api.md §2.3.2), see reduce.cu.
enum : int {
  kDenomConstant = 0,  // none, sum, sum_over_batch_size, batch_size, empty input
  kDenomWeightSum = 1,  // mean: sum(w)
  kDenomNonzero = 2,    // sum_by_nonzero_weights: count(w != 0)
};

// Weight of element i in the (values, block) layout. `count` == 1 is a scalar
// weight (every element); the index is clamped so that no layout, however
// inconsistent, reads past values[count - 1].
template <class A>
GPULOSS_DEVICE A weight_at(const A* values, index_t count, index_t block, index_t i) {
  if (count <= 1) return values[0];
  index_t k;
  // 32-bit unsigned division is several times cheaper than 64-bit on the GPU.
  if (i < 2147483647 && block < 2147483647) k = (index_t)((uint32_t)i / (uint32_t)block);
  else k = i / block;
  return values[k < count ? k : count - 1];
}

// Class index n of a target array of int32 (y_bytes 4) or int64 (8) values:
// both are read as they are stored, so the launch code casts nothing.
GPULOSS_DEVICE int64_t class_index(const void* y, int y_bytes, index_t n) {
  return y_bytes == 4 ? (int64_t) static_cast<const int32_t*>(y)[n] : static_cast<const int64_t*>(y)[n];
}

// Weight of measurement i in the divisor of a mean (reduce.cu): w[i] = values[i / block],
// times for use_targets 1: 0 where y[i] == ignore_index (only when has_ignore),
// 2: the same and cw[y[i]] (an out-of-range target keeps its weight and reads no cw).
template <class A>
GPULOSS_DEVICE double divisor_weight(const A* w_values, index_t w_count, index_t w_block, const void* y,
                                     int y_bytes, const A* cw, index_t classes, int has_ignore,
                                     int64_t ignore_index, int use_targets, index_t i) {
  double w = (double)weight_at(w_values, w_count, w_block, i);
  if (use_targets) {
    const int64_t yi = class_index(y, y_bytes, i);
    if (has_ignore && yi == ignore_index) w = 0.0;
    else if (use_targets == 2 && yi >= 0 && yi < classes) w *= (double)cw[yi];
  }
  return w;
}

// i % period, in 32 bits where both fit (a 64-bit remainder is a long
// instruction sequence on the GPU, paid per element otherwise).
GPULOSS_DEVICE index_t mod_index(index_t i, index_t period) {
  if (i < 2147483647 && period < 2147483647) return (index_t)((uint32_t)i % (uint32_t)period);
  return i % period;
}

template <class A> GPULOSS_DEVICE A abs_nan(A x) { return x < A(0) ? -x : x; }  // NaN stays NaN

// sign(d) with NaN in, NaN out: a NaN element never gets a silent gradient of 0.
template <class A> GPULOSS_DEVICE A sign_nan(A d) {
  if (gl::is_nan(d)) return d;
  return d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
}

// (l, dl/dx) of one element. `param` is the loss's scalar (label smoothing,
// epsilon, delta, beta); `pw` the pos_weight of this element (1 without).
template <int KIND, class A>
GPULOSS_DEVICE void elementwise_loss(A x, A t, A param, A pw, A& l, A& dl) {
  const A one = A(1), zero = A(0);
  if (KIND == kIdentity) {
    l = x;
    dl = one;
  } else if (KIND == kSigmoidXent) {
    // TF sigmoid_cross_entropy label smoothing: t' = t (1 - eps) + eps / 2.
    const A ts = t * (one - param) + A(0.5) * param;
    // log(1 + e^-|x|) and sigmoid(x) from e^-|x|: neither overflows for any x.
    const A e = gl::exp(-abs_nan(x));
    const A softplus_abs = gl::log1p(e);
    // sigmoid(x) - t and sigmoid(x) - 1 without cancellation for t in {0, 1}: with r = 1 / (1 + e),
    // sigmoid = 1 - e r for x >= 0 and e r for x < 0.
    const A r = one / (one + e);
    if (pw == one) {
      l = (x > zero ? x : zero) - x * ts + softplus_abs;
      dl = x >= zero ? (one - ts) - e * r : e * r - ts;
    } else {
      // PyTorch BCEWithLogitsLoss: (1 - t) x + (1 + (p - 1) t) (log1p(e^-|x|) + max(-x, 0)).
      const A coef = one + (pw - one) * ts;
      l = (one - ts) * x + coef * (softplus_abs + (x > zero ? zero : -x));
      dl = (one - ts) - coef * (x >= zero ? e * r : r);
    }
  } else if (KIND == kLogLoss) {  // TF losses.log_loss, param = epsilon
    // log(1 - x + eps) as log1p(eps - x): 1 - x is not rounded, so p ~ 0 keeps its tiny loss.
    l = -t * gl::log(x + param) - (one - t) * gl::log1p(param - x);
    dl = -t / (x + param) + (one - t) / (one - x + param);
  } else if (KIND == kHinge) {  // TF hinge_loss: y = 2t - 1, max(0, 1 - y x)
    const A y = A(2) * t - one;
    const A margin = one - y * x;
    if (margin > zero || gl::is_nan(margin)) {
      l = margin;
      dl = margin > zero ? -y : margin;
    } else {
      l = zero;
      dl = zero;
    }
  } else {
    const A d = x - t;
    if (KIND == kSquared) {
      l = d * d;
      dl = A(2) * d;
    } else if (KIND == kAbsolute) {
      l = abs_nan(d);
      dl = sign_nan(d);
    } else if (KIND == kHuber) {  // TF huber_loss, param = delta
      const A a = abs_nan(d);
      if (a <= param) {
        l = A(0.5) * d * d;
        dl = d;
      } else {
        l = param * (a - A(0.5) * param);
        dl = param * sign_nan(d);
      }
    } else {  // kSmoothL1: PyTorch SmoothL1Loss, param = beta; beta = 0 is L1
      const A a = abs_nan(d);
      if (a < param) {
        l = A(0.5) * d * d / param;
        dl = d / param;
      } else {
        l = a - A(0.5) * param;
        dl = sign_nan(d);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The divisor of a reduction (docs/api.md §2.3.2, reduce.cu). It either sits
// on the device as scal = {denominator, 1/denominator or 0}, written by
// reduce_weights in the launch before (mean, sum_by_nonzero_weights: it
// depends on the weights), or is a number of the shape passed by value (none,
// sum, sum_over_batch_size, batch_size): then no launch computes it.
struct Denom {
  const double* scal;
  double constant;
  int on_device;
  GPULOSS_DEVICE double value() const { return on_device ? scal[0] : constant; }
  GPULOSS_DEVICE double inverse() const {
    if (on_device) return scal[1];
    return constant == 0.0 ? 0.0 : 1.0 / constant;
  }
};

// End of a launch whose result is reduced: each thread brings its float64
// sums l (the weighted losses) and z (the z-terms, 0 when not asked); every
// block writes one partial of each to partials[b] and partials[gridDim.x + b]
// (2 * gridDim.x doubles), and the last block (gl::last_block_done) adds them
// in a fixed order and writes out[0] = sum(l) / denominator, out[1] = sum(z) /
// denominator, both 0 when the denominator is 0 (whatever the totals, even NaN).
// Every thread of every block must call it.
template <class A>
GPULOSS_DEVICE void finish_reduced(double l, double z, double* partials, unsigned int* ticket, const Denom& d,
                                   A* out) {
  __shared__ double scratch[gl::kMaxWarps];
  l = gl::block_reduce_sum(l, scratch);
  z = gl::block_reduce_sum(z, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = l;
    partials[gridDim.x + blockIdx.x] = z;
  }
  if (!gl::last_block_done(ticket)) return;
  const double lt = gl::block_sum_partials(partials, gridDim.x);
  const double zt = gl::block_sum_partials(partials + gridDim.x, gridDim.x);
  if (threadIdx.x == 0) {
    const double den = d.value(), inv = d.inverse();
    out[0] = (A)(den == 0.0 ? 0.0 : lt * inv);
    out[1] = (A)(den == 0.0 ? 0.0 : zt * inv);
  }
  gl::release_ticket(ticket);
}

// ---------------------------------------------------------------------------
// 16-byte vector access. A row of C elements starting anywhere is split into
// a scalar head up to the first 16-byte boundary, a body of whole 16-byte
// packs (one ld.global.v4 / st.global.v4 each on the GPU) and a scalar tail.
// A pointer that is not even element-aligned (impossible for NumPy/CuPy
// arrays) falls back to the scalar path.
template <class T> struct __align__(16) Pack16 {
  enum { N = 16 / sizeof(T) };
  T v[N];
};

GPULOSS_DEVICE unsigned long long address_of(const void* p) { return (unsigned long long)p; }

// Elements before the first 16-byte boundary of `p`, or -1 when p is not
// element-aligned. At most N - 1.
template <class T> GPULOSS_DEVICE index_t head_elements(const T* p) {
  const unsigned long long mis = address_of(p) & 15ull;
  if (mis % sizeof(T) != 0) return -1;
  return (index_t)(((16ull - mis) & 15ull) / sizeof(T));
}

// Calls f(c, x_c) for the columns c of one row that this member (`rank` of
// `size` cooperating threads) owns. A contiguous row (stride 1) is read with
// 16-byte vector loads where its address allows; a strided row (the class
// axis not last: element c at xr[c * stride]) element by element. The split
// depends only on the address, C and stride, so every pass over a row visits
// the same columns from the same threads.
template <class T, class F>
GPULOSS_DEVICE void visit_row(const T* xr, index_t C, index_t stride, int rank, int size, F f) {
  enum { N = Pack16<T>::N };
  if (stride != 1) {
    for (index_t c = rank; c < C; c += size) f(c, gl::load_as_acc(xr, c * stride));
    return;
  }
  index_t head = head_elements(xr);
  if (head < 0 || head > C) head = C;
  const index_t body_end = head + (C - head) / N * N;
  for (index_t c = rank; c < head; c += size) f(c, gl::load_as_acc(xr, c));
  for (index_t c = head + (index_t)rank * N; c < body_end; c += (index_t)size * N) {
    const Pack16<T> pk = *reinterpret_cast<const Pack16<T>*>(xr + c);
    GPULOSS_UNROLL
    for (int k = 0; k < N; ++k) f(c + k, gl::storage<T>::to_acc(pk.v[k]));
  }
  for (index_t c = body_end + rank; c < C; c += size) f(c, gl::load_as_acc(xr, c));
}

// Copy a contiguous row to `copy` (shared memory) with 16-byte loads and
// stores: `copy` must sit at the same offset from a 16-byte boundary as xr
// (row_copy_shift), so the packs stay aligned and visit_row / map_row on
// `copy` split the row between the threads as they would on xr.
template <class T>
GPULOSS_DEVICE void copy_row(const T* xr, index_t C, int rank, int size, T* copy) {
  enum { N = Pack16<T>::N };
  index_t head = head_elements(xr);
  if (head < 0 || head > C) head = C;
  const index_t body_end = head + (C - head) / N * N;
  for (index_t c = rank; c < head; c += size) copy[c] = xr[c];
  for (index_t c = head + (index_t)rank * N; c < body_end; c += (index_t)size * N) {
    *reinterpret_cast<Pack16<T>*>(copy + c) = *reinterpret_cast<const Pack16<T>*>(xr + c);
  }
  for (index_t c = body_end + rank; c < C; c += size) copy[c] = xr[c];
}

// Elements to skip at the start of a 16-byte aligned buffer so that a copy of
// the row xr placed there has xr's offset from a 16-byte boundary.
template <class T> GPULOSS_DEVICE index_t row_copy_shift(const T* xr) {
  const index_t head = head_elements(xr);
  return head > 0 ? (index_t)Pack16<T>::N - head : 0;
}

// As visit_row, and stores g(c, x_c) to the same position of gr (vector
// stores when gr sits at the same offset from a 16-byte boundary as xr).
template <class T, class F>
GPULOSS_DEVICE void map_row(const T* xr, T* gr, index_t C, index_t stride, int rank, int size, F g) {
  enum { N = Pack16<T>::N };
  if (stride != 1) {
    for (index_t c = rank; c < C; c += size) gl::store_from_acc(gr, c * stride, g(c, gl::load_as_acc(xr, c * stride)));
    return;
  }
  index_t head = head_elements(xr);
  if (head < 0 || head > C) head = C;
  const index_t body_end = head + (C - head) / N * N;
  const bool vec_store = (address_of(gr) & 15ull) == (address_of(xr) & 15ull);
  for (index_t c = rank; c < head; c += size) gl::store_from_acc(gr, c, g(c, gl::load_as_acc(xr, c)));
  for (index_t c = head + (index_t)rank * N; c < body_end; c += (index_t)size * N) {
    const Pack16<T> pk = *reinterpret_cast<const Pack16<T>*>(xr + c);
    Pack16<T> out;
    GPULOSS_UNROLL
    for (int k = 0; k < N; ++k) out.v[k] = gl::storage<T>::from_acc(g(c + k, gl::storage<T>::to_acc(pk.v[k])));
    if (vec_store) {
      *reinterpret_cast<Pack16<T>*>(gr + c) = out;
    } else {
      GPULOSS_UNROLL
      for (int k = 0; k < N; ++k) gr[c + k] = out.v[k];
    }
  }
  for (index_t c = body_end + rank; c < C; c += size) gl::store_from_acc(gr, c, g(c, gl::load_as_acc(xr, c)));
}

// Fill a row of gr with v (ignored rows: 0; invalid targets: NaN).
template <class T, class A>
GPULOSS_DEVICE void fill_row(T* gr, index_t C, index_t stride, int rank, int size, A v) {
  const T s = gl::storage<T>::from_acc(v);
  for (index_t c = rank; c < C; c += size) gr[c * stride] = s;
}

}  // namespace gll

#endif  // GPULOSS_LOSSES_CUH
