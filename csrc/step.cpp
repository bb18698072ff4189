// The BackwardInterface step from C++: one call for the fused forward plus the
// injection, and a C++ autograd node whose backward runs the fused update.
//
// Why: at the sizes where per-call cost dominates (B=16, D=128 on a CPU), the
// Python autograd.Function around the primitives cost more than the primitives
// themselves: apply() ~30 us, the Python backward callback ~15 us, and the
// Python side of the injection's engine call ~10 us, measured on the 2-core CI
// CPU against ~20 us for each fused C++ call. Here all of it stays in C++, with
// the GIL released.
//
// Semantics are those of dni_fast/_fused.py's _TriggerUpdate (the Python path
// the Triton backend uses): forward returns (trigger.clone(), S); backward
// passes the true gradient g to the trigger unchanged and returns every
// synthesizer parameter gradient from one fused update with
// delta = scale * (S - g), with the scale the caller computed once
// (dni_fast/regression.py: 2 / g.size(0) for a BackwardInterface). Gradients reach the parameters through
// autograd (hooks, accumulation and DDP behave as in plain PyTorch).
#include "overlap.h"
#include "synth.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>

namespace dni_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kModifiedInputs =
    "the trigger or the context of an overlapped synthesizer update was modified in place after the backward "
    "that queued the update, before the update ran: change them only after a synchronisation point "
    "(dni.synchronize(), optimizer.step()), or train without overlap";

struct TriggerUpdate : public torch::autograd::Function<TriggerUpdate> {
  // Inputs, in autograd's order: trigger, x, c (optional), params (list), scale, stats_slot (optional),
  // overlap_threads (0: the update runs in this backward; n > 0: on the overlap worker with n threads).
  static variable_list forward(AutogradContext* ctx, const Tensor& trigger, const Tensor& x, const OptTensor& c,
                               at::TensorList params, double scale, const OptTensor& stats_slot,
                               int64_t overlap_threads) {
    TensorVec pv(params.begin(), params.end());
    auto [s, zs] = dispatch::synth_forward(x, c, pv);
    variable_list saved;
    saved.reserve(3 + zs.size() + pv.size());
    saved.push_back(x);
    saved.push_back(c.has_value() ? *c : Tensor());
    saved.push_back(s);
    for (auto& z : zs) saved.push_back(z);
    for (auto& p : pv) saved.push_back(p);
    ctx->save_for_backward(saved);
    ctx->saved_data["n_z"] = static_cast<int64_t>(zs.size());
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["overlap"] = overlap_threads;
    // The parameters themselves, for the overlap worker's delivery: under saved-tensor hooks that copy (e.g.
    // torch.autograd.graph.save_on_cpu) the saved ones unpack as copies, and gradients delivered to those
    // reached no parameter.
    if (overlap_threads > 0) ctx->saved_data["params"] = pv;
    ctx->saved_data["trigger_shape"] = trigger.sizes().vec();
    if (stats_slot.has_value()) ctx->saved_data["slot"] = *stats_slot;
    auto shape = trigger.sizes().vec();
    shape.back() = s.size(1);
    Tensor s_shaped = s.view(shape);
    ctx->mark_non_differentiable({s_shaped});
    // S's gradient is never used: don't let autograd materialise zeros for it.
    ctx->set_materialize_grads(false);
    return {trigger.clone(), s_shaped};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The fused update is computed below autograd: under create_graph its parameter gradients would not be
    // differentiable, and a gradient penalty through them would be silently wrong.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "dni_fast: backward with create_graph=True (double backward, a gradient penalty) through a "
                "BackwardInterface on a fused backend: the synthesizer's update is computed outside autograd, so "
                "its gradients would not be differentiable; use backend='reference'");
    auto saved = ctx->get_saved_variables();
    // An unused output arrives undefined: the true gradient is then zero.
    // (zeros of the trigger's shape: for a trigger of 3+ dims, S is its 2-D flattening)
    const Tensor g = grad_outputs[0].defined() ? grad_outputs[0]
                                                : at::zeros(ctx->saved_data["trigger_shape"].toIntVector(),
                                                            saved[2].options());
    const int64_t n_z = ctx->saved_data["n_z"].toInt();
    const Tensor& x = saved[0];
    OptTensor c;
    if (saved[1].defined()) c = saved[1];
    const Tensor& s = saved[2];
    TensorVec zs(saved.begin() + 3, saved.begin() + 3 + n_z);
    TensorVec params(saved.begin() + 3 + n_z, saved.end());
    const double scale = ctx->saved_data["scale"].toDouble();
    Tensor g2 = g.reshape({-1, g.size(-1)});
    if (g2.scalar_type() != s.scalar_type()) g2 = g2.to(s.scalar_type());
    // One statistics row per step: the first update through this node writes it
    // (a second backward with retain_graph still updates the parameters).
    OptTensor slot;
    auto it = ctx->saved_data.find("slot");
    if (it != ctx->saved_data.end()) {
      slot = it->second.toTensor();
      ctx->saved_data.erase(it);
    }
    int64_t overlap_threads = ctx->saved_data["overlap"].toInt();
    if (overlap_threads > 0) {
      // Only a plain backward() (an empty exec_info) accumulates every parameter
      // gradient; under torch.autograd.grad or backward(inputs=...) the engine
      // decides where each gradient goes, so the update runs here, as without
      // overlap (dni_fast/_overlap.py).
      const auto* info = torch::autograd::get_current_graph_task_exec_info();
      if (info != nullptr && !info->empty()) overlap_threads = 0;
    }
    TensorVec grads;
    if (overlap_threads > 0) {
      // Off the main path: the worker computes the gradients; Python delivers
      // them through autograd at the next synchronisation point.
      // The worker reads x and c later: a legal in-place change of either after this backward returns
      // (a reused context buffer) would give a silently different update. Their versions are checked
      // before and after the update runs; a change raises at the synchronisation point.
      const int64_t vx = x._version(), vc = c.has_value() ? c->_version() : 0;
      overlap::submit(
          [=]() {
            auto unchanged = [&] { return x._version() == vx && (!c.has_value() || c->_version() == vc); };
            TORCH_CHECK(unchanged(), kModifiedInputs);
            auto [gr, partials] = dispatch::synth_update(x, c, params, zs, s, g2, scale, std::nullopt);
            TORCH_CHECK(unchanged(), kModifiedInputs);
            if (slot.has_value()) slot->copy_(partials);
            return gr;
          },
          ctx->saved_data["params"].toTensorVector(), static_cast<int>(overlap_threads));
      grads.resize(params.size());  // undefined: no gradient from this backward
    } else {
      auto [gr, partials] = dispatch::synth_update(x, c, params, zs, s, g2, scale, std::nullopt);
      if (slot.has_value()) slot->copy_(partials, /*non_blocking=*/true);
      grads = std::move(gr);
    }
    variable_list out;
    out.reserve(5 + grads.size());
    out.push_back(ctx->needs_input_grad(0) ? g : Tensor());  // trigger
    out.push_back(Tensor());                                // x
    out.push_back(Tensor());                                // c
    for (auto& gr : grads) out.push_back(gr);               // params
    out.push_back(Tensor());                                // scale
    out.push_back(Tensor());                                // stats_slot
    out.push_back(Tensor());                                // overlap_threads
    return out;
  }
};

}  // namespace

std::tuple<Tensor, Tensor> trigger_step(const Tensor& trigger, const Tensor& x, const OptTensor& c,
                                        const TensorVec& params, double scale, const OptTensor& stats_slot,
                                        const OptTensor& inject_into, int64_t overlap_threads) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < trigger.dim(); ++d) rows *= trigger.size(d);
  TORCH_CHECK(trigger.dim() >= 1 && x.dim() == 2 && rows == x.size(0) && trigger.size(-1) == x.size(1),
              "dni_fast._C.trigger_step: trigger of shape ", trigger.sizes(), " does not match x of shape ", x.sizes(),
              " (x is the trigger flattened to (rows, features))");
  if (stats_slot.has_value() && stats_slot->defined()) {
    const Tensor& r = *stats_slot;
    TORCH_CHECK(r.scalar_type() == at::kFloat && r.dim() == 1 && r.size(0) == 4 && r.device() == x.device(),
                "dni_fast._C.trigger_step: stats_slot must be a float32 tensor of shape (4,) on ", x.device(),
                ", got ", dtype_name(r.scalar_type()), " of shape ", r.sizes(), " on ", r.device());
  }
  auto outs = TriggerUpdate::apply(trigger, x, c, at::TensorList(params), scale, stats_slot, overlap_threads);
  Tensor out = outs[0], s = outs[1];
  if (inject_into.has_value() && inject_into->requires_grad()) {
    // The injection: h.backward(S) now, so the part before the interface has its gradient.
    torch::autograd::backward({*inject_into}, {s});
  }
  return {out, s};
}

}  // namespace dni_fast
