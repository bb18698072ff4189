// The `cpp` backend: the fused synthesizer step on CPU tensors, one C++ call each.
//
// Matrix products go straight to the CPU kernels (at::cpu::addmm / mm, i.e. MKL or
// oneDNN), bypassing the dispatcher and autograd; the elementwise glue is two
// hand-written single-pass loops:
//   * epilogue: delta = k * (s - g), the 4 regression partials and the last
//     layer's bias gradient (column sum of delta), in one pass over s and g;
//   * relu_mask: for a hidden layer, delta_prev = (delta @ W) * relu'(z),
//     a = relu(z) (for the layer's weight gradient) and the bias gradient of the
//     layer below, in one pass over z.
// Accumulation is in fp32 for bf16/fp16 and in the input's type otherwise. On
// CPUs without AMX, bf16/fp16 products run in fp32 (see work_dtype below).
#include "synth.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <cpuid.h>
#endif

namespace dni_fast {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// elementwise glue
//
// The loops are written to auto-vectorise. Extensions are compiled for the
// baseline x86-64 ISA (SSE2), so on x86-64 each loop is also compiled for
// AVX2+FMA and picked at run time, as ATen does for its own kernels.
// ---------------------------------------------------------------------------
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define DNI_AVX2_CLONES 1
#define DNI_BODY __attribute__((always_inline)) inline
#else
#define DNI_BODY inline
#endif

bool use_avx2() {
#ifdef DNI_AVX2_CLONES
  static const bool ok = [] {
    const char* force = std::getenv("DNI_FAST_CPU_BASELINE");
    if (force != nullptr && force[0] != '\0' && force[0] != '0') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// Both loops walk the rows in memory order and keep per-column accumulators in
// a small buffer (L1-resident), so the inner loop has no scalar reductions and
// vectorises without -ffast-math. (Register-blocking a chunk of columns over
// all rows was tried: it thrashes L1 on power-of-two widths, 5x slower at
// 256 x 1024.)
//
// Type parameters: T = the activations' dtype (s, g, z), TW = the work dtype
// of the matrix products (T, or float when low precision is computed in fp32),
// TB = the parameters' dtype (the bias gradients).
template <typename T, typename TW, typename TB>
DNI_BODY void epilogue_body(const T* __restrict s, const T* __restrict g, int64_t n, int64_t d,
                            at::opmath_type<T> k, TW* __restrict delta, float* __restrict partials,
                            TB* __restrict db) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> buf(static_cast<size_t>(5 * d), acc_t(0));
  acc_t* __restrict col = buf.data();
  acc_t* __restrict p0 = col + d;
  acc_t* __restrict p1 = p0 + d;
  acc_t* __restrict p2 = p1 + d;
  acc_t* __restrict p3 = p2 + d;
  for (int64_t i = 0; i < n; ++i) {
    const T* si = s + i * d;
    const T* gi = g + i * d;
    TW* di = delta + i * d;
    for (int64_t j = 0; j < d; ++j) {
      const acc_t sv = static_cast<acc_t>(si[j]);
      const acc_t gv = static_cast<acc_t>(gi[j]);
      const acc_t diff = sv - gv;
      const acc_t dd = k * diff;
      di[j] = static_cast<TW>(dd);
      col[j] += dd;
      p0[j] += diff * diff;
      p1[j] += sv * gv;
      p2[j] += sv * sv;
      p3[j] += gv * gv;
    }
  }
  acc_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  for (int64_t j = 0; j < d; ++j) {
    r0 += p0[j];
    r1 += p1[j];
    r2 += p2[j];
    r3 += p3[j];
    db[j] = static_cast<TB>(col[j]);
  }
  partials[0] = static_cast<float>(r0);
  partials[1] = static_cast<float>(r1);
  partials[2] = static_cast<float>(r2);
  partials[3] = static_cast<float>(r3);
}

template <typename T, typename TW, typename TB>
DNI_BODY void relu_mask_body(const T* __restrict z, TW* __restrict dz, TW* __restrict a, int64_t n, int64_t h,
                             TB* __restrict db) {
  using acc_t = at::opmath_type<TW>;
  std::vector<acc_t> buf(static_cast<size_t>(h), acc_t(0));
  acc_t* __restrict col = buf.data();
  const TW zero(0);
  for (int64_t i = 0; i < n; ++i) {
    const T* zi = z + i * h;
    TW* dzi = dz + i * h;
    TW* ai = a + i * h;
    for (int64_t j = 0; j < h; ++j) {
      const TW zv = static_cast<TW>(zi[j]);
      const bool pos = static_cast<acc_t>(zv) > acc_t(0);
      const TW dv = pos ? dzi[j] : zero;
      ai[j] = pos ? zv : zero;
      dzi[j] = dv;
      col[j] += static_cast<acc_t>(dv);
    }
  }
  for (int64_t j = 0; j < h; ++j) db[j] = static_cast<TB>(col[j]);
}

// The entry points: the baseline build of each body, and its AVX2 build where
// the CPU has AVX2 and FMA (DNI_FAST_CPU_BASELINE=1 forces the baseline, for tests).
template <typename T, typename TW, typename TB>
void epilogue_baseline(const T* s, const T* g, int64_t n, int64_t d, at::opmath_type<T> k, TW* delta,
                       float* partials, TB* db) {
  epilogue_body<T, TW, TB>(s, g, n, d, k, delta, partials, db);
}
template <typename T, typename TW, typename TB>
void relu_mask_baseline(const T* z, TW* dz, TW* a, int64_t n, int64_t h, TB* db) {
  relu_mask_body<T, TW, TB>(z, dz, a, n, h, db);
}
#ifdef DNI_AVX2_CLONES
template <typename T, typename TW, typename TB>
__attribute__((target("avx2,fma"))) void epilogue_avx2(const T* s, const T* g, int64_t n, int64_t d,
                                                       at::opmath_type<T> k, TW* delta, float* partials, TB* db) {
  epilogue_body<T, TW, TB>(s, g, n, d, k, delta, partials, db);
}
template <typename T, typename TW, typename TB>
__attribute__((target("avx2,fma"))) void relu_mask_avx2(const T* z, TW* dz, TW* a, int64_t n, int64_t h,
                                                        TB* db) {
  relu_mask_body<T, TW, TB>(z, dz, a, n, h, db);
}
#endif

template <typename T, typename TW, typename TB>
void epilogue_loop(const T* s, const T* g, int64_t n, int64_t d, at::opmath_type<T> k, TW* delta,
                   float* partials, TB* db) {
#ifdef DNI_AVX2_CLONES
  if (use_avx2()) return epilogue_avx2<T, TW, TB>(s, g, n, d, k, delta, partials, db);
#endif
  epilogue_baseline<T, TW, TB>(s, g, n, d, k, delta, partials, db);
}
template <typename T, typename TW, typename TB>
void relu_mask_loop(const T* z, TW* dz, TW* a, int64_t n, int64_t h, TB* db) {
#ifdef DNI_AVX2_CLONES
  if (use_avx2()) return relu_mask_avx2<T, TW, TB>(z, dz, a, n, h, db);
#endif
  relu_mask_baseline<T, TW, TB>(z, dz, a, n, h, db);
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>, Tag<TW>, Tag<TB>) for the layout's activation dtype T, the
// work dtype TW and the parameters' dtype TB. fp32/fp64 activations imply
// TW = TB = T (the argument checks allow lower-precision x only with fp32 params).
template <typename F>
void dispatch_types(const Layout& lay, at::ScalarType work, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lay.compute, "dni_fast_cpu", [&] {
    using T = scalar_t;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      f(Tag<T>{}, Tag<T>{}, Tag<T>{});
    } else {
      const bool work_f32 = work == at::kFloat, param_f32 = lay.param == at::kFloat;
      if (work_f32 && param_f32) {
        f(Tag<T>{}, Tag<float>{}, Tag<float>{});
      } else if (work_f32) {
        f(Tag<T>{}, Tag<float>{}, Tag<T>{});
      } else if (param_f32) {
        f(Tag<T>{}, Tag<T>{}, Tag<float>{});
      } else {
        f(Tag<T>{}, Tag<T>{}, Tag<T>{});
      }
    }
  });
}

// delta (N, Do) in the work dtype, partials (4,) fp32, db (Do,) in the param dtype.
void epilogue(const Layout& lay, at::ScalarType work, const Tensor& s, const Tensor& g, double k, Tensor& delta,
              Tensor& partials, Tensor& db) {
  const int64_t n = s.size(0), d = s.size(1);
  dispatch_types(lay, work, [&](auto t, auto tw, auto tb) {
    using T = typename decltype(t)::type;
    using TW = typename decltype(tw)::type;
    using TB = typename decltype(tb)::type;
    epilogue_loop<T, TW, TB>(s.const_data_ptr<T>(), g.const_data_ptr<T>(), n, d,
                             static_cast<at::opmath_type<T>>(k), delta.data_ptr<TW>(), partials.data_ptr<float>(),
                             db.data_ptr<TB>());
  });
}

// dz *= relu'(z); a = relu(z); db = colsum(dz). z in the activation dtype, dz and a in the work dtype.
void relu_mask(const Layout& lay, at::ScalarType work, const Tensor& z, Tensor& dz, Tensor& a, Tensor& db) {
  const int64_t n = z.size(0), h = z.size(1);
  dispatch_types(lay, work, [&](auto t, auto tw, auto tb) {
    using T = typename decltype(t)::type;
    using TW = typename decltype(tw)::type;
    using TB = typename decltype(tb)::type;
    relu_mask_loop<T, TW, TB>(z.const_data_ptr<T>(), dz.data_ptr<TW>(), a.data_ptr<TW>(), n, h, db.data_ptr<TB>());
  });
}

// ---------------------------------------------------------------------------
// the work dtype of bf16/fp16: native, or fp32
//
// Without AMX, oneDNN's bf16/fp16 GEMMs are ~2x slower than MKL's fp32 ones
// (measured on an AVX512-BF16 Xeon, 16x128 to 256x1024), so low-precision
// steps compute their products in fp32 (reading and writing the low-precision
// tensors; more accurate too) unless the CPU has AMX for that dtype.
// DNI_FAST_CPU_LOWP_GEMM=native|fp32|auto (or _C._set_cpu_lowp_gemm) overrides.
// ---------------------------------------------------------------------------
enum LowpMode : int { kLowpAuto = 0, kLowpNative = 1, kLowpFp32 = 2 };
std::atomic<int> g_lowp_mode{-1};  // -1: not read from the environment yet

LowpMode parse_lowp_mode(const std::string& s, const char* where) {
  if (s.empty() || s == "auto") return kLowpAuto;
  if (s == "native") return kLowpNative;
  if (s == "fp32") return kLowpFp32;
  TORCH_CHECK(false, where, ": expected 'auto', 'native' or 'fp32', got '", s, "'");
}

LowpMode lowp_mode() {
  int m = g_lowp_mode.load(std::memory_order_relaxed);
  if (m < 0) {
    const char* env = std::getenv("DNI_FAST_CPU_LOWP_GEMM");
    m = parse_lowp_mode(env ? env : "", "DNI_FAST_CPU_LOWP_GEMM");
    g_lowp_mode.store(m, std::memory_order_relaxed);
  }
  return static_cast<LowpMode>(m);
}

bool cpu_has_amx_for(at::ScalarType t) {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), amx_bf16 = d & (1u << 22);
  if (!tile) return false;
  if (t == at::kBFloat16) return amx_bf16;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a & (1u << 21);  // AMX-FP16
#else
  (void)t;
  return false;
#endif
}

at::ScalarType work_dtype(const Layout& lay) {
  if (lay.compute != at::kBFloat16 && lay.compute != at::kHalf) return lay.compute;
  switch (lowp_mode()) {
    case kLowpNative: return lay.compute;
    case kLowpFp32: return at::kFloat;
    default: break;
  }
  static const bool amx_bf16 = cpu_has_amx_for(at::kBFloat16);
  static const bool amx_fp16 = cpu_has_amx_for(at::kHalf);
  return (lay.compute == at::kBFloat16 ? amx_bf16 : amx_fp16) ? lay.compute : at::kFloat;
}

// ---------------------------------------------------------------------------
// the step
// ---------------------------------------------------------------------------
void check_cpu_dtype(const char* fn, const Layout& lay) {
  TORCH_CHECK(lay.compute == at::kFloat || lay.compute == at::kDouble || lay.compute == at::kBFloat16 ||
                  lay.compute == at::kHalf,
              fn, ": the cpp backend supports float32, float64, bfloat16 and float16, got ", dtype_name(lay.compute));
}

inline Tensor cast(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// Returns s (in x's dtype); fills zs with the L pre-activations (in x's dtype).
Tensor forward_impl(const Layout& lay, at::ScalarType work, const Tensor& x, const OptTensor& c, WorkParams& w,
                    TensorVec& zs) {
  const Tensor xw = cast(x, work);
  Tensor z;
  if (lay.has_context) {
    // both biases folded into one addmm, the context product accumulated (beta = 1)
    z = at::cpu::addmm(at::cpu::add(w[1], w[3]), xw, w[0].t());
    at::cpu::addmm_(z, cast(*c, work), w[2].t());
  } else {
    z = at::cpu::addmm(w[1], xw, w[0].t());
  }
  zs.clear();
  zs.reserve(lay.n_hidden);
  Tensor a;  // relu buffer, reused across layers of the same width
  for (int64_t l = 0; l < lay.n_hidden; ++l) {
    const int64_t i = lay.first_hidden + 2 * l;
    zs.push_back(cast(z, lay.compute));
    if (a.defined() && a.sizes() == z.sizes()) {
      at::cpu::clamp_min_out(a, z, 0);
    } else {
      a = at::cpu::relu(z);
    }
    z = at::cpu::addmm(w[i + 1], a, w[i].t());
  }
  return cast(z, lay.compute);
}

UpdateResult update_impl(const Layout& lay, at::ScalarType work, const Tensor& x, const OptTensor& c,
                         WorkParams& w, const TensorVec& zs, const Tensor& s, const Tensor& g, double scale,
                         const OptTensor& grad_scale) {
  const int64_t n = lay.rows, d_out = lay.out_dim;
  const auto wopts = s.options().dtype(work);
  const auto popts = s.options().dtype(lay.param);
  double k = scale;
  if (grad_scale.has_value() && grad_scale->defined()) k *= grad_scale->item<double>();

  const Tensor sc = s.contiguous();
  const Tensor gc = cast(g, lay.compute).contiguous();
  Tensor delta = at::empty({n, d_out}, wopts);
  Tensor partials = at::empty({4}, s.options().dtype(at::kFloat));
  Tensor db = at::empty({d_out}, popts);
  epilogue(lay, work, sc, gc, k, delta, partials, db);

  TensorVec grads(w.size());
  Tensor a;  // relu(z) buffer, reused across layers of the same width
  for (int64_t l = lay.n_hidden; l >= 1; --l) {
    const int64_t i = lay.first_hidden + 2 * (l - 1);
    grads[i + 1] = db;
    const Tensor z = zs[l - 1].contiguous();
    Tensor dprev = at::cpu::mm(delta, w[i]);  // (N, H): delta through layer l's weight
    if (!(a.defined() && a.sizes() == z.sizes())) a = at::empty(z.sizes(), wopts);
    db = at::empty({z.size(1)}, popts);
    relu_mask(lay, work, z, dprev, a, db);  // dprev *= relu'(z); a = relu(z); db = colsum(dprev)
    grads[i] = cast(at::cpu::mm(delta.t(), a), lay.param);
    delta = std::move(dprev);
  }
  const Tensor dt = delta.t();
  grads[0] = cast(at::cpu::mm(dt, cast(x, work)), lay.param);
  grads[1] = db;
  if (lay.has_context) {
    grads[2] = cast(at::cpu::mm(dt, cast(*c, work)), lay.param);
    grads[3] = db.clone();
  }
  return {std::move(grads), std::move(partials)};
}

}  // namespace

const DeviceOps ops{"cpp", check_cpu_dtype, work_dtype, forward_impl, update_impl};

void set_lowp_gemm(const std::string& mode) {
  g_lowp_mode.store(parse_lowp_mode(mode, "dni_fast._C._set_cpu_lowp_gemm"), std::memory_order_relaxed);
}

std::string lowp_gemm(at::ScalarType dtype) {
  Layout lay;
  lay.compute = dtype;
  lay.param = dtype;
  return work_dtype(lay) == dtype ? "native" : "fp32";
}

}  // namespace cpu
}  // namespace dni_fast
