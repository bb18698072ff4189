// Argument validation shared by the CPU and CUDA paths of dni_fast._C.
#include "synth.h"

#include <string>

namespace dni_fast {

namespace {

std::string param_name(size_t i, bool has_context) {
  const char* kind = (i % 2 == 0) ? "weight" : "bias";
  if (i < 2) return std::string("input_trigger.") + kind;
  if (has_context && i < 4) return std::string("input_context.") + kind;
  const size_t first_hidden = has_context ? 4 : 2;
  return "layers." + std::to_string((i - first_hidden) / 2) + "." + kind;
}

bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

}  // namespace

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

Layout check_forward_args(const char* fn, const Tensor& x, const OptTensor& c, const TensorVec& params) {
  TORCH_CHECK(x.defined(), fn, ": the trigger x is undefined");
  TORCH_CHECK(x.dim() == 2, fn, ": the trigger x must be 2-D (rows, features); flatten leading dims first. Got shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), fn, ": the trigger x must be floating point, got ",
              dtype_name(x.scalar_type()));
  // Dense tensors only: a sparse or mkldnn one failed later with "unsupported memory format option Contiguous".
  TORCH_CHECK(x.layout() == at::kStrided, fn, ": the trigger x must be a dense (strided) tensor, got layout ",
              x.layout(), "; call .to_dense() first");
  TORCH_CHECK(!c.has_value() || !c->defined() || c->layout() == at::kStrided, fn,
              ": the context c must be a dense (strided) tensor, got layout ", c->layout());

  Layout lay;
  lay.has_context = c.has_value() && c->defined();
  lay.first_hidden = lay.has_context ? 4 : 2;
  lay.rows = x.size(0);
  const int64_t np = static_cast<int64_t>(params.size());
  TORCH_CHECK(np >= lay.first_hidden && (np - lay.first_hidden) % 2 == 0, fn,
              ": bad parameter list length ", np, " ", (lay.has_context ? "with" : "without"),
              " a context: expected 2 (input_trigger)", (lay.has_context ? " + 2 (input_context)" : ""),
              " + 2 * n_hidden tensors (weight, bias pairs)");
  lay.n_hidden = (np - lay.first_hidden) / 2;

  for (int64_t i = 0; i < np; ++i) {
    const Tensor& p = params[i];
    const std::string name = param_name(i, lay.has_context);
    TORCH_CHECK(p.defined(), fn, ": parameter ", i, " (", name, ") is undefined");
    TORCH_CHECK(p.layout() == at::kStrided, fn, ": parameter ", i, " (", name, ") must be a dense (strided) tensor, "
                "got layout ", p.layout());
    TORCH_CHECK(p.device() == x.device(), fn, ": parameter ", i, " (", name, ") is on ", p.device(),
                " but the trigger x is on ", x.device());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), fn, ": parameter ", i, " (", name,
                ") must be floating point, got ", dtype_name(p.scalar_type()));
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), fn, ": parameter ", i, " (", name, ") has dtype ",
                dtype_name(p.scalar_type()), " but parameter 0 (input_trigger.weight) has ",
                dtype_name(params[0].scalar_type()),
                "; all synthesizer parameters must share one dtype");
    TORCH_CHECK(p.dim() == (i % 2 == 0 ? 2 : 1), fn, ": parameter ", i, " (", name, ") must be ",
                (i % 2 == 0 ? "2-D (out, in)" : "1-D (out,)"), ", got shape ", p.sizes());
  }
  lay.compute = x.scalar_type();
  lay.param = params[0].scalar_type();
  TORCH_CHECK(lay.compute == lay.param || (lay.param == at::kFloat && is_low_precision(lay.compute)), fn,
              ": the trigger x has dtype ", dtype_name(lay.compute), " but the parameters have dtype ",
              dtype_name(lay.param),
              "; x must have the parameters' dtype, or be float16/bfloat16 with float32 parameters (autocast)");

  // input_trigger
  const int64_t h0 = params[0].size(0);
  TORCH_CHECK(params[0].size(1) == x.size(1), fn, ": wrong trigger width: x has ", x.size(1),
              " features but input_trigger.weight has shape ", params[0].sizes(), " (expects ", params[0].size(1),
              ")");
  TORCH_CHECK(params[1].size(0) == h0, fn, ": input_trigger.bias has shape ", params[1].sizes(), ", expected (", h0,
              ",)");
  // input_context
  if (lay.has_context) {
    const Tensor& ct = *c;
    TORCH_CHECK(ct.dim() == 2, fn, ": the context c must be 2-D (rows, features), got shape ", ct.sizes());
    TORCH_CHECK(ct.size(0) == x.size(0), fn, ": the context c has ", ct.size(0), " rows but the trigger x has ",
                x.size(0));
    TORCH_CHECK(ct.device() == x.device(), fn, ": the context c is on ", ct.device(), " but the trigger x is on ",
                x.device());
    TORCH_CHECK(ct.scalar_type() == lay.compute || ct.scalar_type() == lay.param, fn, ": the context c has dtype ",
                dtype_name(ct.scalar_type()), "; expected ", dtype_name(lay.compute), " (the trigger's) or ",
                dtype_name(lay.param),
                " (the parameters')");
    TORCH_CHECK(params[2].size(0) == h0 && params[2].size(1) == ct.size(1), fn, ": wrong context width: c has ",
                ct.size(1), " features and input_trigger has ", h0, " outputs, but input_context.weight has shape ",
                params[2].sizes());
    TORCH_CHECK(params[3].size(0) == h0, fn, ": input_context.bias has shape ", params[3].sizes(), ", expected (",
                h0, ",)");
  }
  // hidden layers
  int64_t h = h0;
  for (int64_t l = 0; l < lay.n_hidden; ++l) {
    const int64_t i = lay.first_hidden + 2 * l;
    TORCH_CHECK(params[i].size(1) == h, fn, ": ", param_name(i, lay.has_context), " has shape ", params[i].sizes(),
                " but the layer before it has ", h, " outputs");
    h = params[i].size(0);
    TORCH_CHECK(params[i + 1].size(0) == h, fn, ": ", param_name(i + 1, lay.has_context), " has shape ",
                params[i + 1].sizes(), ", expected (", h, ",)");
  }
  lay.out_dim = h;
  return lay;
}

void check_update_args(const char* fn, const Layout& lay, const Tensor& x, const OptTensor& c,
                       const TensorVec& params, const TensorVec& zs, const Tensor& s, const Tensor& g,
                       const OptTensor& grad_scale) {
  (void)c;
  TORCH_CHECK(static_cast<int64_t>(zs.size()) == lay.n_hidden, fn, ": expected ", lay.n_hidden,
              " saved pre-activations zs (one per hidden layer), got ", zs.size());
  for (int64_t l = 0; l < lay.n_hidden; ++l) {
    const Tensor& z = zs[l];
    const int64_t h = params[l == 0 ? 0 : lay.first_hidden + 2 * (l - 1)].size(0);
    TORCH_CHECK(z.defined() && z.dim() == 2 && z.size(0) == lay.rows && z.size(1) == h, fn, ": zs[", l,
                "] must have shape (", lay.rows, ", ", h, "), got ", (z.defined() ? z.sizes() : at::IntArrayRef{}));
    TORCH_CHECK(z.device() == x.device(), fn, ": zs[", l, "] is on ", z.device(), " but x is on ", x.device());
    TORCH_CHECK(z.scalar_type() == lay.compute, fn, ": zs[", l, "] has dtype ", dtype_name(z.scalar_type()),
                ", expected ", dtype_name(lay.compute), " (x's dtype)");
  }
  TORCH_CHECK(s.defined() && s.dim() == 2 && s.size(0) == lay.rows && s.size(1) == lay.out_dim, fn,
              ": s must have shape (", lay.rows, ", ", lay.out_dim, "), got ",
              (s.defined() ? s.sizes() : at::IntArrayRef{}));
  TORCH_CHECK(s.device() == x.device(), fn, ": s is on ", s.device(), " but x is on ", x.device());
  TORCH_CHECK(s.scalar_type() == lay.compute, fn, ": s has dtype ", dtype_name(s.scalar_type()), ", expected ",
              dtype_name(lay.compute), " (x's dtype)");
  TORCH_CHECK(g.defined() && g.dim() == 2 && g.size(0) == lay.rows && g.size(1) == lay.out_dim, fn,
              ": the target g must have shape (", lay.rows, ", ", lay.out_dim, ") like s, got ",
              (g.defined() ? g.sizes() : at::IntArrayRef{}));
  TORCH_CHECK(g.device() == x.device(), fn, ": the target g is on ", g.device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), fn, ": the target g must be floating point, got ",
              dtype_name(g.scalar_type()));
  if (grad_scale.has_value() && grad_scale->defined()) {
    const Tensor& gs = *grad_scale;
    TORCH_CHECK(gs.numel() == 1, fn, ": grad_scale must be a 0-dim (one-element) tensor, got shape ", gs.sizes());
    TORCH_CHECK(gs.device() == x.device(), fn, ": grad_scale is on ", gs.device(), " but x is on ", x.device());
    TORCH_CHECK(at::isFloatingType(gs.scalar_type()), fn, ": grad_scale must be floating point, got ",
                dtype_name(gs.scalar_type()));
  }
}

std::pair<Layout, Layout> check_pipelined_args(const char* fn, const Tensor& x, const OptTensor& c,
                                               const TensorVec& params, const Tensor& x_prev,
                                               const OptTensor& c_prev, const TensorVec& zs_prev,
                                               const Tensor& s_prev, const Tensor& g_prev) {
  const Layout lay = check_forward_args(fn, x, c, params);
  TORCH_CHECK(lay.has_context == (c_prev.has_value() && c_prev->defined()), fn,
              ": c and c_prev must both be tensors or both be None");
  const Layout lay_prev = check_forward_args("dni_fast._C.synth_pipelined (x_prev, c_prev)", x_prev, c_prev, params);
  TORCH_CHECK(lay.compute == lay_prev.compute, fn, ": x has dtype ", dtype_name(lay.compute), " but x_prev has ",
              dtype_name(lay_prev.compute));
  check_update_args(fn, lay_prev, x_prev, c_prev, params, zs_prev, s_prev, g_prev, std::nullopt);
  return {lay, lay_prev};
}

}  // namespace dni_fast
