// Launchers of the `cuda` backend's hand-written kernels: the elementwise and
// reduction glue between the cuBLAS products. Plain C++ over raw pointers and
// CUDA runtime types, so that synth_cuda_kernels.cu needs no torch headers
// (and can be compile-checked with nvcc alone: .ci/check_cuda.sh).
//
// All matrices are dense row-major (leading dimension = number of columns).
// Every launcher enqueues one kernel on `stream`, never synchronises, and
// returns the launch status (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dni_fast {
namespace cuda_kernels {

// Element types the kernels take: the activation dtype T and the dtype TB of
// the bias gradients (T itself, or fp32 when autocast keeps fp32 parameters).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One pass over s and g (n x d):
//   delta[i, j] = k * (s - g)  with k = scale * (*grad_scale if grad_scale else 1)
//   db[j]       = sum_i delta[i, j]          (the last layer's bias gradient)
//   partials   += [sum (s-g)^2, sum s*g, sum s^2, sum g^2]   (fp32, atomically:
//                 the caller zero-fills partials first)
// Accumulation in fp32. grad_scale points to one fp32 value on the device (or is null).
cudaError_t launch_epilogue(DType t, DType tb, const void* s, const void* g, int64_t n, int64_t d, float scale,
                            const float* grad_scale, void* delta, float* partials, void* db, cudaStream_t stream);

// One pass over a hidden layer's pre-activation z (n x h):
//   dz[i, j] = z > 0 ? dz[i, j] : 0   (in place: dz holds delta @ W on entry)
//   a[i, j]  = max(z, 0)              (relu(z), for the layer's weight gradient)
//   db[j]    = sum_i dz[i, j]         (the bias gradient of the layer that made z)
cudaError_t launch_relu_mask(DType t, DType tb, const void* z, void* dz, void* a, int64_t n, int64_t h, void* db,
                             cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace dni_fast
