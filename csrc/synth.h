// dni_fast._C: the fused synthesizer step (cpp and cuda backends).
//
// The contract is kernels/synth_ref.py: synth_forward_ref, synth_update_ref and
// synth_pipelined_ref, with the same argument order, shapes and return values.
// Layout of the flat parameter list (dni-pytorch's order):
//   w_t (H0, Dt), b_t (H0)  [w_c (H0, Dc), b_c (H0)]  w_1 (H1, H0), b_1 (H1) ... w_L, b_L
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace dni_fast {

using at::Tensor;
using TensorVec = std::vector<Tensor>;
using OptTensor = std::optional<Tensor>;

using ForwardResult = std::tuple<Tensor, TensorVec>;                      // (s, zs)
using UpdateResult = std::tuple<TensorVec, Tensor>;                       // (grads, partials)
using PipelinedResult = std::tuple<Tensor, TensorVec, TensorVec, Tensor>;  // (s, zs, grads, partials)

// What the parameter list and the inputs imply; filled by check_forward_args.
struct Layout {
  int64_t n_hidden = 0;          // L
  bool has_context = false;
  int64_t first_hidden = 2;      // index of w_1 in params
  int64_t rows = 0;              // N
  at::ScalarType compute = at::kFloat;  // dtype of the arithmetic, s and zs (x's dtype)
  at::ScalarType param = at::kFloat;    // dtype of the parameters and their gradients
  int64_t out_dim = 0;           // Do: rows of the last layer's weight
};

// "torch.float32" etc., as Python spells dtypes, for error messages.
std::string dtype_name(at::ScalarType t);

// Validation shared by the CPU and CUDA paths. `fn` names the entry point in messages.
Layout check_forward_args(const char* fn, const Tensor& x, const OptTensor& c, const TensorVec& params);
void check_update_args(const char* fn, const Layout& lay, const Tensor& x, const OptTensor& c,
                       const TensorVec& params, const TensorVec& zs, const Tensor& s, const Tensor& g,
                       const OptTensor& grad_scale);
// The pipelined step's checks (both halves); returns the layouts of step t+1 and step t.
std::pair<Layout, Layout> check_pipelined_args(const char* fn, const Tensor& x, const OptTensor& c, const TensorVec& params,
                            const Tensor& x_prev, const OptTensor& c_prev, const TensorVec& zs_prev,
                            const Tensor& s_prev, const Tensor& g_prev);

// The parameters in the work dtype of the products, each converted on first use
// (once per call, even when the pipelined step uses a weight in both halves);
// a no-op unless autocast or a low-precision CPU step mixes dtypes.
class WorkParams {
 public:
  WorkParams(const TensorVec& params, at::ScalarType work) : params_(params), work_(work), cache_(params.size()) {}
  const Tensor& operator[](size_t i) {
    if (params_[i].scalar_type() == work_) return params_[i];
    if (!cache_[i].defined()) cache_[i] = params_[i].to(work_);
    return cache_[i];
  }
  size_t size() const { return params_.size(); }

 private:
  const TensorVec& params_;
  at::ScalarType work_;
  TensorVec cache_;
};

// What differs between the devices: one table each (synth_cpu.cpp, synth_cuda.cpp).
// The entry points (bindings.cpp) are written once over it: validate, pick the
// table by the tensor's device, convert the parameters to the work dtype once,
// call `forward` / `update`.
struct DeviceOps {
  const char* backend;                                 // "cpp" or "cuda", for messages
  void (*check_dtype)(const char* fn, const Layout& lay);
  at::ScalarType (*work_dtype)(const Layout& lay);     // the dtype of the matrix products
  // Returns s (in lay.compute); fills zs with the L pre-activations.
  Tensor (*forward)(const Layout& lay, at::ScalarType work, const Tensor& x, const OptTensor& c, WorkParams& w,
                    TensorVec& zs);
  UpdateResult (*update)(const Layout& lay, at::ScalarType work, const Tensor& x, const OptTensor& c, WorkParams& w,
                         const TensorVec& zs, const Tensor& s, const Tensor& g, double scale,
                         const OptTensor& grad_scale);
};

namespace cpu {
extern const DeviceOps ops;
// The dtype of bf16/fp16 matrix products: "auto" (fp32 unless the CPU has AMX
// for the dtype), "native" or "fp32". lowp_gemm says what a dtype gets now.
void set_lowp_gemm(const std::string& mode);
std::string lowp_gemm(at::ScalarType dtype);
}  // namespace cpu

#ifdef DNI_FAST_WITH_CUDA
namespace cuda {
extern const DeviceOps ops;
}  // namespace cuda
#endif

// The three primitives, for any device (bindings.cpp). `scale` is the
// regression's gradient scale, computed once by the caller (dni_fast/regression.py).
namespace dispatch {
ForwardResult synth_forward(const Tensor& x, const OptTensor& c, const TensorVec& params);
UpdateResult synth_update(const Tensor& x, const OptTensor& c, const TensorVec& params, const TensorVec& zs,
                          const Tensor& s, const Tensor& g, double scale, const OptTensor& grad_scale);
PipelinedResult synth_pipelined(const Tensor& x, const OptTensor& c, const TensorVec& params,
                                const Tensor& x_prev, const OptTensor& c_prev, const TensorVec& zs_prev,
                                const Tensor& s_prev, const Tensor& g_prev, double scale);
}  // namespace dispatch

// The whole BackwardInterface step from C++ (step.cpp): returns (trigger.clone(), s shaped like trigger).
std::tuple<Tensor, Tensor> trigger_step(const Tensor& trigger, const Tensor& x, const OptTensor& c,
                                        const TensorVec& params, double scale, const OptTensor& stats_slot,
                                        const OptTensor& inject_into, int64_t overlap_threads);

}  // namespace dni_fast
