// The `cuda` backend: the fused synthesizer step on CUDA tensors.
//
// The matrix products are cuBLAS (through at::addmm / at::mm, so TF32 and the
// other math-mode switches behave as in PyTorch); the glue is two hand-written
// kernels (synth_cuda_kernels.cu):
//   * epilogue: delta = k*(s-g) with k = scale * *grad_scale read on the device,
//     the 4 partials and the last layer's bias gradient, in one pass;
//   * relu_mask: relu'(z) mask, relu(z) and the bias gradient of the layer
//     below, in one pass.
// Launches per update (fp32/bf16 params, no autocast): 1 fill (partials) +
// 1 epilogue + per hidden layer (2 GEMMs + 1 mask) + 1 GEMM per input layer.
// No host synchronisation anywhere.
#include "synth.h"
#include "synth_cuda_kernels.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace dni_fast {
namespace cuda {
namespace {

namespace ck = cuda_kernels;

ck::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ck::DType::kFloat32;
    case at::kHalf: return ck::DType::kFloat16;
    case at::kBFloat16: return ck::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "dni_fast cuda kernels: unsupported dtype ", dtype_name(t));
}

void check_cuda_dtype(const char* fn, const Layout& lay) {
  TORCH_CHECK(lay.compute == at::kFloat || lay.compute == at::kBFloat16 || lay.compute == at::kHalf, fn,
              ": the cuda backend supports float32, bfloat16 and float16, got ", dtype_name(lay.compute),
              " (use the reference backend for float64)");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dni_fast cuda backend: launching the ", what, " kernel failed: ",
              cudaGetErrorString(err));
}

inline Tensor cast(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The products run in the activations' dtype (lay.compute); fp32 accumulation is cuBLAS's.
at::ScalarType work_dtype(const Layout& lay) { return lay.compute; }

Tensor forward_impl(const Layout& lay, at::ScalarType /*work*/, const Tensor& x, const OptTensor& c, WorkParams& w,
                    TensorVec& zs) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor z;
  if (lay.has_context) {
    z = at::addmm(at::add(w[1], w[3]), x, w[0].t());
    z.addmm_(cast(*c, lay.compute), w[2].t());
  } else {
    z = at::addmm(w[1], x, w[0].t());
  }
  zs.clear();
  zs.reserve(lay.n_hidden);
  for (int64_t l = 0; l < lay.n_hidden; ++l) {
    const int64_t i = lay.first_hidden + 2 * l;
    zs.push_back(z);
    z = at::addmm(w[i + 1], at::relu(z), w[i].t());
  }
  return z;
}

UpdateResult update_impl(const Layout& lay, at::ScalarType /*work*/, const Tensor& x, const OptTensor& c,
                         WorkParams& w, const TensorVec& zs, const Tensor& s, const Tensor& g, double scale,
                         const OptTensor& grad_scale) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = lay.rows, d_out = lay.out_dim;
  const auto copts = s.options();
  const auto popts = copts.dtype(lay.param);
  const ck::DType t = kernel_dtype(lay.compute), tb = kernel_dtype(lay.param);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  Tensor gs;  // grad_scale as one fp32 on the device, read by the kernel: no host sync
  if (grad_scale.has_value() && grad_scale->defined()) gs = grad_scale->to(at::kFloat).contiguous();
  const float* gs_ptr = gs.defined() ? gs.const_data_ptr<float>() : nullptr;

  const Tensor sc = s.contiguous();
  const Tensor gc = cast(g, lay.compute).contiguous();
  Tensor delta = at::empty({n, d_out}, copts);
  Tensor partials = at::zeros({4}, copts.dtype(at::kFloat));
  Tensor db = at::empty({d_out}, popts);
  check_launch(ck::launch_epilogue(t, tb, sc.const_data_ptr(), gc.const_data_ptr(), n, d_out,
                                   static_cast<float>(scale), gs_ptr, delta.data_ptr(), partials.data_ptr<float>(),
                                   db.data_ptr(), stream),
               "epilogue");

  TensorVec grads(w.size());
  for (int64_t l = lay.n_hidden; l >= 1; --l) {
    const int64_t i = lay.first_hidden + 2 * (l - 1);
    grads[i + 1] = db;
    const Tensor z = zs[l - 1].contiguous();
    Tensor dprev = at::mm(delta, w[i]);  // (N, H)
    Tensor a = at::empty_like(z);
    db = at::empty({z.size(1)}, popts);
    check_launch(ck::launch_relu_mask(t, tb, z.const_data_ptr(), dprev.data_ptr(), a.data_ptr(), n, z.size(1),
                                      db.data_ptr(), stream),
                 "relu_mask");
    grads[i] = cast(at::mm(delta.t(), a), lay.param);
    delta = std::move(dprev);
  }
  const Tensor dt = delta.t();
  grads[0] = cast(at::mm(dt, x), lay.param);
  grads[1] = db;
  if (lay.has_context) {
    grads[2] = cast(at::mm(dt, cast(*c, lay.compute)), lay.param);
    grads[3] = db.clone();
  }
  return {std::move(grads), std::move(partials)};
}

}  // namespace

const DeviceOps ops{"cuda", check_cuda_dtype, work_dtype, forward_impl, update_impl};

}  // namespace cuda
}  // namespace dni_fast
