// Python bindings of dni_fast._C: one entry point per primitive, dispatching on
// the trigger's device to the CPU (`cpp` backend) or CUDA (`cuda` backend) code.
#include <torch/extension.h>

#include "synth.h"

namespace {

using namespace dni_fast;

#ifdef DNI_FAST_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

[[noreturn]] void unsupported_device(const char* fn, const Tensor& x) {
  if (x.is_cuda()) {
    TORCH_CHECK(false, fn, ": x is a CUDA tensor but dni_fast._C was built without CUDA; rebuild it where torch has "
                           "CUDA: `DNI_FAST_FORCE_CUDA=TRUE pip install --no-build-isolation -e .`");
  }
  TORCH_CHECK(false, fn, ": unsupported device ", x.device(), "; dni_fast._C runs on CPU and CUDA tensors");
}

}  // namespace

namespace dni_fast {
namespace dispatch {

ForwardResult synth_forward(const Tensor& x, const OptTensor& c, const TensorVec& params) {
  if (x.is_cpu()) return cpu::synth_forward(x, c, params);
#ifdef DNI_FAST_WITH_CUDA
  if (x.is_cuda()) return cuda::synth_forward(x, c, params);
#endif
  unsupported_device("dni_fast._C.synth_forward", x);
}

UpdateResult synth_update(const Tensor& x, const OptTensor& c, const TensorVec& params, const TensorVec& zs,
                          const Tensor& s, const Tensor& g, double scale, const OptTensor& grad_scale) {
  if (x.is_cpu()) return cpu::synth_update(x, c, params, zs, s, g, scale, grad_scale);
#ifdef DNI_FAST_WITH_CUDA
  if (x.is_cuda()) return cuda::synth_update(x, c, params, zs, s, g, scale, grad_scale);
#endif
  unsupported_device("dni_fast._C.synth_update", x);
}

PipelinedResult synth_pipelined(const Tensor& x, const OptTensor& c, const TensorVec& params, const Tensor& x_prev,
                                const OptTensor& c_prev, const TensorVec& zs_prev, const Tensor& s_prev,
                                const Tensor& g_prev, double scale) {
  if (x.is_cpu()) return cpu::synth_pipelined(x, c, params, x_prev, c_prev, zs_prev, s_prev, g_prev, scale);
#ifdef DNI_FAST_WITH_CUDA
  if (x.is_cuda()) return cuda::synth_pipelined(x, c, params, x_prev, c_prev, zs_prev, s_prev, g_prev, scale);
#endif
  unsupported_device("dni_fast._C.synth_pipelined", x);
}

}  // namespace dispatch
}  // namespace dni_fast

using namespace dni_fast::dispatch;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "dni_fast fused synthesizer step (cpp / cuda backends); contract: dni_fast.kernels.synth_ref";
  m.attr("WITH_CUDA") = py::bool_(kWithCuda);
  m.def("synth_forward", &synth_forward, py::arg("x"), py::arg("c"), py::arg("params"),
        py::call_guard<py::gil_scoped_release>(),
        "Synthesizer forward: returns (s, zs), as synth_forward_ref.");
  m.def("synth_update", &synth_update, py::arg("x"), py::arg("c"), py::arg("params"), py::arg("zs"), py::arg("s"),
        py::arg("g"), py::arg("scale"), py::arg("grad_scale") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "Regression loss partials and every parameter gradient: returns (grads, partials), as synth_update_ref.");
  m.def("_set_cpu_lowp_gemm", &cpu::set_lowp_gemm, py::arg("mode"),
        "CPU bf16/fp16 products: 'auto' (fp32 unless the CPU has AMX for the dtype), 'native' or 'fp32'. "
        "Default: $DNI_FAST_CPU_LOWP_GEMM or 'auto'.");
  m.def(
      "_cpu_lowp_gemm",
      [](const py::object& dtype) { return cpu::lowp_gemm(torch::python::detail::py_object_to_dtype(dtype)); },
      py::arg("dtype"), "'native' or 'fp32': how CPU products of this dtype run now.");
  m.def("trigger_step", &dni_fast::trigger_step, py::arg("trigger"), py::arg("x"), py::arg("c"), py::arg("params"),
        py::arg("stats_slot") = py::none(), py::arg("inject_into") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "BackwardInterface step in one C++ call: the fused forward, the C++ autograd node whose backward runs "
        "the fused update, and the injection of S into inject_into's graph when given. Returns (out, s).");
  m.def("synth_pipelined", &synth_pipelined, py::arg("x"), py::arg("c"), py::arg("params"), py::arg("x_prev"),
        py::arg("c_prev"), py::arg("zs_prev"), py::arg("s_prev"), py::arg("g_prev"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(),
        "Step t+1's forward and step t's update in one call: returns (s, zs, grads_prev, partials_prev).");
}
