// emu_selftest.cu — kernels that test the emulated backend's runtime itself
// (tests/test_emulator.py), not any loss: barriers, warp intrinsics, grid
// indexing, early exits, atomics, argument packing, failure reporting.
// Plain CUDA C for NVRTC too: no includes, no toolkit headers.
#ifndef GPULOSS_REGISTER
#define GPULOSS_REGISTER(name)
#endif
#ifndef GPULOSS_DYNAMIC_SHARED
#define GPULOSS_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// One block reduces blockDim.x consecutive elements with the classic
// shared-memory tree (blockDim.x a power of two, at most 1024): every level
// needs the barrier, so a broken __syncthreads shows as a wrong sum.
template <class T>
__device__ void tree_sum(const T* x, T* out, int n) {
  __shared__ T buf[1024];
  const unsigned t = threadIdx.x;
  const int i = (int)(blockIdx.x * blockDim.x + t);
  buf[t] = i < n ? x[i] : T(0);
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] = buf[t] + buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}
extern "C" __global__ void emu_tree_sum_f32(const float* x, float* out, int n) { tree_sum(x, out, n); }
GPULOSS_REGISTER(emu_tree_sum_f32)
extern "C" __global__ void emu_tree_sum_f64(const double* x, double* out, int n) { tree_sum(x, out, n); }
GPULOSS_REGISTER(emu_tree_sum_f64)

// Warp shuffles: out has 5 rows of blockDim.x*gridDim.x values each:
//   0: xor butterfly sum (every lane gets the warp's total)
//   1: shfl_down sum as written in CUDA samples (lane 0 holds the total;
//      lanes whose source is out of range add their own value)
//   2: shfl_up inclusive scan
//   3: shfl broadcast of lane `src`
//   4: xor butterfly sum within segments of `width` lanes
template <class T>
__device__ void warp_ops(const T* x, T* out, int src, int width) {
  const unsigned n = blockDim.x * gridDim.x;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const T v = x[i];
  T a = v;
  for (int o = 16; o > 0; o >>= 1) a = a + __shfl_xor_sync(0xffffffffu, a, o);
  out[i] = a;
  T d = v;
  for (int o = 16; o > 0; o >>= 1) d = d + __shfl_down_sync(0xffffffffu, d, o);
  out[n + i] = d;
  T s = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T u = __shfl_up_sync(0xffffffffu, s, o);
    if ((int)lane >= o) s = s + u;
  }
  out[2 * n + i] = s;
  out[3 * n + i] = __shfl_sync(0xffffffffu, v, src);
  T w = v;
  for (int o = width / 2; o > 0; o >>= 1) w = w + __shfl_xor_sync(0xffffffffu, w, o, width);
  out[4 * n + i] = w;
}
#define EMU_WARP_OPS(sfx, T) \
  extern "C" __global__ void emu_warp_ops_##sfx(const T* x, T* out, int src, int width) { warp_ops(x, out, src, width); } \
  GPULOSS_REGISTER(emu_warp_ops_##sfx)
EMU_WARP_OPS(f32, float)
EMU_WARP_OPS(f64, double)
EMU_WARP_OPS(i32, int)
EMU_WARP_OPS(u32, unsigned int)
EMU_WARP_OPS(i64, long long)

// Votes: per thread, ballot / any / all of (x[i] != 0) and __activemask(),
// in a block whose size need not be a multiple of 32.
extern "C" __global__ void emu_votes(const int* x, unsigned* out) {
  const unsigned n = blockDim.x * gridDim.x;
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = x[i] != 0;
  out[i] = __ballot_sync(0xffffffffu, p);
  out[n + i] = (unsigned)__any_sync(0xffffffffu, p);
  out[2 * n + i] = (unsigned)__all_sync(0xffffffffu, p);
  out[3 * n + i] = __activemask();
  out[4 * n + i] = (unsigned)__syncthreads_count(p);
  out[5 * n + i] = (unsigned)__syncthreads_or(p);
  out[6 * n + i] = (unsigned)__syncthreads_and(p);
}
GPULOSS_REGISTER(emu_votes)

// Two halves of each warp shuffle at the same time with disjoint masks
// (lanes 0-15 rotate among themselves, lanes 16-31 likewise), then the whole
// warp meets: partial masks must not wait for lanes outside them.
extern "C" __global__ void emu_half_warps(const int* x, int* out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const int base = lane < 16 ? 0 : 16;
  int v = x[i];
  v = __shfl_sync(mask, v, base + (int)((lane + 1) % 16));
  __syncwarp();
  out[i] = v + __shfl_xor_sync(0xffffffffu, v, 16);
}
GPULOSS_REGISTER(emu_half_warps)

// Every thread writes its coordinates at its global linear position in a
// 3-D launch: out[g*6 + k] = (blockIdx.xyz, threadIdx.xyz)[k], where
// g = ((bz*gy + by)*gx + bx) * threads_per_block + (tz*bdy + ty)*bdx + tx.
extern "C" __global__ void emu_coords(int* out) {
  const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const unsigned g = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
  int* o = out + 6 * g;
  o[0] = (int)blockIdx.x; o[1] = (int)blockIdx.y; o[2] = (int)blockIdx.z;
  o[3] = (int)threadIdx.x; o[4] = (int)threadIdx.y; o[5] = (int)threadIdx.z;
}
GPULOSS_REGISTER(emu_coords)

// 2-D indexing as a kernel would write it: y[r, c] = 2 * x[r, c] + r over an
// rows x cols matrix with row stride `ld`, covered by a 2-D grid of 2-D blocks.
extern "C" __global__ void emu_matrix_2d(const float* x, float* y, int rows, int cols, long long ld) {
  const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  const int r = (int)(blockIdx.y * blockDim.y + threadIdx.y);
  if (r >= rows || c >= cols) return;
  y[r * ld + c] = 2.0f * x[r * ld + c] + (float)r;
}
GPULOSS_REGISTER(emu_matrix_2d)

// Threads with threadIdx.x >= active return before the block synchronises;
// the rest still meet at __syncthreads (exited threads no longer count) and
// read a neighbour's value through shared memory.
extern "C" __global__ void emu_early_exit(const int* x, int* out, int active) {
  __shared__ int buf[1024];
  const unsigned t = threadIdx.x;
  if ((int)t >= active) return;
  buf[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  int v = buf[(t + 1) % (unsigned)active];
  __syncthreads();
  const unsigned live = __ballot_sync(__activemask(), 1);
  out[blockIdx.x * blockDim.x + t] = v + (int)__popc(live);
}
GPULOSS_REGISTER(emu_early_exit)

// Atomics from every thread of every block. counters: [0] add, [1] max,
// [2] min, [3] or, [4] and, [5] xor, [6] inc with wrap at 9, [7] exch;
// fsum/dsum: floating adds of small integers (exact whatever the order);
// fmax: float max through an atomicCAS loop, as kernels write it.
extern "C" __global__ void emu_atomics(const int* x, int* counters, unsigned* ucounters, unsigned long long* big,
                                       float* fsum, double* dsum, float* fmax_out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = x[i];
  atomicAdd(&counters[0], v);
  atomicMax(&counters[1], v);
  atomicMin(&counters[2], v);
  atomicOr(&ucounters[3], 1u << (i % 32));
  atomicAnd(&ucounters[4], ~(1u << (i % 32)));
  atomicXor(&ucounters[5], 1u << (i % 7));
  atomicInc(&ucounters[6], 9u);
  atomicExch(&counters[7], 7);
  atomicAdd(&big[0], (unsigned long long)v);
  atomicAdd(fsum, (float)v);
  atomicAdd(dsum, (double)v);
  int* addr = reinterpret_cast<int*>(fmax_out);
  int old = *addr;
  while (__int_as_float(old) < (float)v) {
    const int assumed = old;
    old = atomicCAS(addr, assumed, __float_as_int((float)v));
    if (old == assumed) break;
  }
}
GPULOSS_REGISTER(emu_atomics)

// Argument packing: every scalar type written back, bit for bit.
extern "C" __global__ void emu_echo(signed char a, unsigned char b, short c, unsigned short d, int e, unsigned int f,
                                    long long g, unsigned long long h, float fl, double db, bool flag,
                                    long long* ints, unsigned long long* uints, double* floats) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  ints[0] = a; ints[1] = c; ints[2] = e; ints[3] = g;
  uints[0] = b; uints[1] = d; uints[2] = f; uints[3] = h; uints[4] = flag ? 1u : 0u;
  floats[0] = (double)fl; floats[1] = db;
}
GPULOSS_REGISTER(emu_echo)

// A nullable pointer: the shared launch code passes None (CuPy: NULL).
extern "C" __global__ void emu_nullable(const float* maybe, float* out) {
  out[threadIdx.x] = maybe ? maybe[threadIdx.x] : -1.0f;
}
GPULOSS_REGISTER(emu_nullable)

// Dynamic shared memory: reverse each block's slice through it.
extern "C" __global__ void emu_dynamic_shared(const float* x, float* y) {
  GPULOSS_DYNAMIC_SHARED(float, buf);
  const unsigned t = threadIdx.x, base = blockIdx.x * blockDim.x;
  buf[t] = x[base + t];
  __syncthreads();
  y[base + t] = buf[blockDim.x - 1 - t];
}
GPULOSS_REGISTER(emu_dynamic_shared)

// Failure modes the launcher must report instead of hanging or crashing:
//   mode 0: odd threads wait at __syncthreads while even ones wait in a
//           full-warp __syncwarp (a deadlock on the GPU as well);
//   mode 1: thread 5 of block 1 calls __trap().
extern "C" __global__ void emu_broken(int mode) {
  if (mode == 0) {
    if (threadIdx.x % 2) __syncthreads();
    else __syncwarp();
  } else if (mode == 1) {
    if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
    __syncthreads();
  }
}
GPULOSS_REGISTER(emu_broken)
