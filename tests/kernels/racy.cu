// racy.cu — deliberately broken kernels, the sanitizer proofs of docs/design.md §7.3.
//
//   racy_shift_unsynced(x, y, n): each thread stores x[i] in shared memory
//       and reads its neighbour's slot with NO __syncthreads() in between:
//       a data race that ThreadSanitizer must report (on a GPU it reads
//       stale shared memory whenever the neighbour's warp runs late).
//   racy_shift_synced(x, y, n): the same with the barrier: no report.
//   racy_read_past_end(x, y, n): copies x[0..n] into y (n + 1 elements), so
//       it reads x[n], one element past the array:
//       AddressSanitizer must report a heap-buffer-overflow.
#ifndef GPULOSS_REGISTER
#define GPULOSS_REGISTER(name)
#endif

template <bool kSync>
__device__ void shift(const float* x, float* y, int n) {
  __shared__ float buf[1024];
  const unsigned t = threadIdx.x;
  const int i = (int)(blockIdx.x * blockDim.x + t);
  buf[t] = i < n ? x[i] : 0.0f;
  if (kSync) __syncthreads();
  const float neighbour = buf[(t + 1) % blockDim.x];
  if (i < n) y[i] = neighbour;
}

extern "C" __global__ void racy_shift_unsynced(const float* x, float* y, int n) { shift<false>(x, y, n); }
GPULOSS_REGISTER(racy_shift_unsynced)
extern "C" __global__ void racy_shift_synced(const float* x, float* y, int n) { shift<true>(x, y, n); }
GPULOSS_REGISTER(racy_shift_synced)

extern "C" __global__ void racy_read_past_end(const float* x, float* y, int n) {
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i <= n) y[i] = x[i];  // `<=`: the off-by-one under test (y holds n + 1 elements)
}
GPULOSS_REGISTER(racy_read_past_end)
