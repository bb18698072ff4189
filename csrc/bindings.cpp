// Python bindings of dni_fast._C, and the three primitives written once for
// every device: validate, pick the device's DeviceOps table (synth_cpu.cpp for
// the `cpp` backend, synth_cuda.cpp for `cuda`), convert the parameters to the
// work dtype once, run. The contract is dni_fast/kernels/synth_ref.py.
#include <torch/extension.h>

#include "overlap.h"
#include "synth.h"

namespace dni_fast {
namespace {

#ifdef DNI_FAST_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

const DeviceOps& ops_for(const char* fn, const Tensor& x) {
  if (x.is_cpu()) return cpu::ops;
#ifdef DNI_FAST_WITH_CUDA
  if (x.is_cuda()) return cuda::ops;
#endif
  TORCH_CHECK(!x.is_cuda(), fn, ": x is a CUDA tensor but dni_fast._C was built without its CUDA part; rebuild it "
              "where torch has CUDA and the CUDA toolkit is complete: "
              "`DNI_FAST_FORCE_CUDA=TRUE pip install --no-build-isolation -e .`");
  TORCH_CHECK(false, fn, ": unsupported device ", x.device(), "; dni_fast._C runs on CPU and CUDA tensors");
}

}  // namespace

namespace dispatch {

ForwardResult synth_forward(const Tensor& x, const OptTensor& c, const TensorVec& params) {
  constexpr const char* fn = "dni_fast._C.synth_forward";
  const Layout lay = check_forward_args(fn, x, c, params);
  const DeviceOps& ops = ops_for(fn, x);
  ops.check_dtype(fn, lay);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType work = ops.work_dtype(lay);
  WorkParams w(params, work);
  TensorVec zs;
  Tensor s = ops.forward(lay, work, x, c, w, zs);
  return {std::move(s), std::move(zs)};
}

UpdateResult synth_update(const Tensor& x, const OptTensor& c, const TensorVec& params, const TensorVec& zs,
                          const Tensor& s, const Tensor& g, double scale, const OptTensor& grad_scale) {
  constexpr const char* fn = "dni_fast._C.synth_update";
  const Layout lay = check_forward_args(fn, x, c, params);
  const DeviceOps& ops = ops_for(fn, x);
  ops.check_dtype(fn, lay);
  check_update_args(fn, lay, x, c, params, zs, s, g, grad_scale);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType work = ops.work_dtype(lay);
  WorkParams w(params, work);
  return ops.update(lay, work, x, c, w, zs, s, g, scale, grad_scale);
}

PipelinedResult synth_pipelined(const Tensor& x, const OptTensor& c, const TensorVec& params, const Tensor& x_prev,
                                const OptTensor& c_prev, const TensorVec& zs_prev, const Tensor& s_prev,
                                const Tensor& g_prev, double scale) {
  constexpr const char* fn = "dni_fast._C.synth_pipelined";
  const auto [lay, lay_prev] = check_pipelined_args(fn, x, c, params, x_prev, c_prev, zs_prev, s_prev, g_prev);
  const DeviceOps& ops = ops_for(fn, x);
  ops.check_dtype(fn, lay);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType work = ops.work_dtype(lay);
  WorkParams w(params, work);  // each weight converted once (autocast / fp32 work), shared by both halves
  TensorVec zs;
  Tensor s = ops.forward(lay, work, x, c, w, zs);
  auto [grads, partials] = ops.update(lay_prev, work, x_prev, c_prev, w, zs_prev, s_prev, g_prev, scale, std::nullopt);
  return {std::move(s), std::move(zs), std::move(grads), std::move(partials)};
}

}  // namespace dispatch
}  // namespace dni_fast

using namespace dni_fast::dispatch;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "dni_fast fused synthesizer step (cpp / cuda backends); contract: dni_fast.kernels.synth_ref";
  m.attr("WITH_CUDA") = py::bool_(dni_fast::kWithCuda);
  m.def("synth_forward", &synth_forward, py::arg("x"), py::arg("c"), py::arg("params"),
        py::call_guard<py::gil_scoped_release>(),
        "Synthesizer forward: returns (s, zs), as synth_forward_ref.");
  m.def("synth_update", &synth_update, py::arg("x"), py::arg("c"), py::arg("params"), py::arg("zs"), py::arg("s"),
        py::arg("g"), py::arg("scale"), py::arg("grad_scale") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "Regression loss partials and every parameter gradient: returns (grads, partials), as synth_update_ref.");
  m.def("synth_pipelined", &synth_pipelined, py::arg("x"), py::arg("c"), py::arg("params"), py::arg("x_prev"),
        py::arg("c_prev"), py::arg("zs_prev"), py::arg("s_prev"), py::arg("g_prev"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(),
        "Step t+1's forward and step t's update in one call: returns (s, zs, grads_prev, partials_prev).");
  m.def("trigger_step", &dni_fast::trigger_step, py::arg("trigger"), py::arg("x"), py::arg("c"), py::arg("params"),
        py::arg("scale"), py::arg("stats_slot") = py::none(), py::arg("inject_into") = py::none(),
        py::arg("overlap_threads") = 0, py::call_guard<py::gil_scoped_release>(),
        "BackwardInterface step in one C++ call: the fused forward, the C++ autograd node whose backward runs "
        "the fused update with delta = scale * (S - g), and the injection of S into inject_into's graph when "
        "given. Returns (out, s). overlap_threads > 0: the update runs on the C++ overlap worker instead "
        "(collected by _overlap_collect).");
  m.def("_overlap_pending", &dni_fast::overlap::pending, "Updates queued on the C++ overlap worker, not collected.");
  m.def("_overlap_collect", &dni_fast::overlap::collect, py::call_guard<py::gil_scoped_release>(),
        "Wait for the C++ overlap worker; [(params, grads)] per update in submission order (raises the first "
        "failure and drops the batch).");
  m.def("_set_cpu_lowp_gemm", &dni_fast::cpu::set_lowp_gemm, py::arg("mode"),
        "CPU bf16/fp16 products: 'auto' (fp32 unless the CPU has AMX for the dtype), 'native' or 'fp32'. "
        "Default: $DNI_FAST_CPU_LOWP_GEMM or 'auto'.");
  m.def(
      "_cpu_lowp_gemm",
      [](const py::object& dtype) {
        return dni_fast::cpu::lowp_gemm(torch::python::detail::py_object_to_dtype(dtype));
      },
      py::arg("dtype"), "'native' or 'fp32': how CPU products of this dtype run now.");
}
