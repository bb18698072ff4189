// The `cuda` backend's glue kernels (see synth_cuda_kernels.h). CUDA headers only.
//
// Layout: a block owns a tile of kTileX columns over all rows (threads along y
// stride over the rows), so each column's sum (a bias gradient) is finished
// inside one block, with no atomics and a deterministic order. Only the four
// scalar partials of the epilogue cross blocks, by one fp32 atomicAdd per block.
#include "synth_cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace dni_fast {
namespace cuda_kernels {
namespace {

constexpr int kTileX = 32;  // columns per block: one warp reads kTileX consecutive elements of a row
constexpr int kTileY = 16;  // row lanes per block
constexpr int kThreads = kTileX * kTileY;
constexpr int kWarps = kThreads / 32;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static float make_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
  __device__ __forceinline__ static float make_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ __forceinline__ static float make_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of `v` over threadIdx.y for each threadIdx.x; the result is valid in the
// threads with threadIdx.y == 0. `buf` is kTileY x (kTileX + 1) floats of shared memory.
__device__ __forceinline__ float column_sum(float v, float (*buf)[kTileX + 1]) {
  buf[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  float acc = 0.f;
  if (threadIdx.y == 0) {
#pragma unroll
    for (int y = 0; y < kTileY; ++y) acc += buf[y][threadIdx.x];
  }
  return acc;
}

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
    epilogue_kernel(const T* __restrict__ s, const T* __restrict__ g, int64_t n, int64_t d, float scale,
                    const float* __restrict__ grad_scale, T* __restrict__ delta, float* __restrict__ partials,
                    TB* __restrict__ db) {
  __shared__ float col_buf[kTileY][kTileX + 1];
  __shared__ float warp_buf[4][kWarps];

  const float k = grad_scale != nullptr ? scale * __ldg(grad_scale) : scale;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  float csum = 0.f, p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
  if (col < d) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < n; r += kTileY) {
      const int64_t idx = r * d + col;
      const float sv = Cvt<T>::load(s + idx);
      const float gv = Cvt<T>::load(g + idx);
      const float diff = sv - gv;
      const float dd = k * diff;
      delta[idx] = Cvt<T>::from_float(dd);
      csum += dd;
      p0 += diff * diff;
      p1 += sv * gv;
      p2 += sv * sv;
      p3 += gv * gv;
    }
  }

  // the bias gradient: this block owns its columns over all rows
  const float colsum = column_sum(csum, col_buf);
  if (threadIdx.y == 0 && col < d) db[col] = Cvt<TB>::from_float(colsum);

  // the four partials: warp shuffles, then one warp over the warps' sums
  const int tid = threadIdx.y * kTileX + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  p0 = warp_sum(p0);
  p1 = warp_sum(p1);
  p2 = warp_sum(p2);
  p3 = warp_sum(p3);
  if (lane == 0) {
    warp_buf[0][warp] = p0;
    warp_buf[1][warp] = p1;
    warp_buf[2][warp] = p2;
    warp_buf[3][warp] = p3;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float v = lane < kWarps ? warp_buf[q][lane] : 0.f;
      v = warp_sum(v);
      if (lane == 0) atomicAdd(partials + q, v);
    }
  }
}

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
    relu_mask_kernel(const T* __restrict__ z, T* __restrict__ dz, T* __restrict__ a, int64_t n, int64_t h,
                     TB* __restrict__ db) {
  __shared__ float col_buf[kTileY][kTileX + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  const T zero = Cvt<T>::from_float(0.f);
  float csum = 0.f;
  if (col < h) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < n; r += kTileY) {
      const int64_t idx = r * h + col;
      const T zv = z[idx];
      const bool pos = Cvt<T>::make_float(zv) > 0.f;
      const T dv = pos ? dz[idx] : zero;
      dz[idx] = dv;
      a[idx] = pos ? zv : zero;
      csum += Cvt<T>::make_float(dv);
    }
  }
  const float colsum = column_sum(csum, col_buf);
  if (threadIdx.y == 0 && col < h) db[col] = Cvt<TB>::from_float(colsum);
}

inline dim3 grid_for(int64_t cols) { return dim3(static_cast<unsigned>((cols + kTileX - 1) / kTileX)); }
const dim3 kBlock(kTileX, kTileY);

template <typename T, typename TB>
cudaError_t epilogue_typed(const void* s, const void* g, int64_t n, int64_t d, float scale, const float* grad_scale,
                           void* delta, float* partials, void* db, cudaStream_t stream) {
  epilogue_kernel<T, TB><<<grid_for(d), kBlock, 0, stream>>>(
      static_cast<const T*>(s), static_cast<const T*>(g), n, d, scale, grad_scale, static_cast<T*>(delta), partials,
      static_cast<TB*>(db));
  return cudaGetLastError();
}

template <typename T, typename TB>
cudaError_t relu_mask_typed(const void* z, void* dz, void* a, int64_t n, int64_t h, void* db, cudaStream_t stream) {
  relu_mask_kernel<T, TB><<<grid_for(h), kBlock, 0, stream>>>(static_cast<const T*>(z), static_cast<T*>(dz),
                                                              static_cast<T*>(a), n, h, static_cast<TB*>(db));
  return cudaGetLastError();
}

// Calls F<T, TB>(args...) for the supported (T, TB) pairs.
#define DNI_CUDA_DISPATCH(t, tb, FN, ...)                                                     \
  do {                                                                                        \
    if ((t) == DType::kFloat32 && (tb) == DType::kFloat32) return FN<float, float>(__VA_ARGS__); \
    if ((t) == DType::kFloat16 && (tb) == DType::kFloat16) return FN<__half, __half>(__VA_ARGS__); \
    if ((t) == DType::kFloat16 && (tb) == DType::kFloat32) return FN<__half, float>(__VA_ARGS__); \
    if ((t) == DType::kBFloat16 && (tb) == DType::kBFloat16)                                  \
      return FN<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__);                                   \
    if ((t) == DType::kBFloat16 && (tb) == DType::kFloat32) return FN<__nv_bfloat16, float>(__VA_ARGS__); \
    return cudaErrorInvalidValue;                                                             \
  } while (0)

}  // namespace

cudaError_t launch_epilogue(DType t, DType tb, const void* s, const void* g, int64_t n, int64_t d, float scale,
                            const float* grad_scale, void* delta, float* partials, void* db, cudaStream_t stream) {
  if (d <= 0) return cudaSuccess;  // nothing to write; the caller's zero partials stand
  DNI_CUDA_DISPATCH(t, tb, epilogue_typed, s, g, n, d, scale, grad_scale, delta, partials, db, stream);
}

cudaError_t launch_relu_mask(DType t, DType tb, const void* z, void* dz, void* a, int64_t n, int64_t h, void* db,
                             cudaStream_t stream) {
  if (h <= 0) return cudaSuccess;
  DNI_CUDA_DISPATCH(t, tb, relu_mask_typed, z, dz, a, n, h, db, stream);
}

}  // namespace cuda_kernels
}  // namespace dni_fast
