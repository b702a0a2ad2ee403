// CPU kernels of the dual (primal + tangent) train-mode BatchNorm (see
// sgr_ext/ops/dual_batchnorm.py for the contract, sgr_ext/engine/dual/batchnorm.py for the math).
//
// Ops (namespace sgr_ext_cpp, CPU only; the contract of kernels/dual_batchnorm.py):
//   dual_bn_fwd(Tensor z, Tensor? weight, Tensor? bias, float eps, bool relu) -> (Tensor out, Tensor stats)
//   dual_bn_apply(Tensor z, Tensor stats, bool relu) -> Tensor out
//   dual_bn_bwd(Tensor z, Tensor grad, Tensor? weight, Tensor stats, bool relu)
//       -> (Tensor grad_z, Tensor grad_weight, Tensor grad_bias)
// z (2n, C, *spatial): rows [0, n) primal x, rows [n, 2n) tangent t; any float dtype, any
// strides. stats (7, C) in the accumulate dtype (double for double z, float otherwise):
// mean, rstd, mt, s, a, beta, d; y = a (x - mean) + beta, yt = a (t - mt) + d (x - mean).
//
// One task per channel (at::parallel_for), each a fixed-order loop, so results do not depend on
// the thread count. Values are centred (x - mean, t - mt) before they are multiplied, and
// sums accumulate in double (the backward's over chunks of 1024 positions summed in the
// element type first): float32 inputs whose |mean| is many times their std lose nothing to
// cancellation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace {

enum Row { kMean = 0, kRstd, kMt, kS, kA, kBeta, kD, kRows };

// positions per partial sum of the backward reduction (see bwd_impl)
constexpr int64_t kChunk = 1024;

// A (2n, C, S) view of a packed tensor: a view for NCHW, channels_last and (B, C) / (B, C, L)
// layouts, a copy where the spatial axes cannot be merged (inputs only).
at::Tensor as3d(const at::Tensor& t) { return t.dim() == 2 ? t.unsqueeze(-1) : t.reshape({t.size(0), t.size(1), -1}); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_packed(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), "sgr_ext_cpp.dual_bn: CPU tensors expected, got ", name, " on ", z.device());
  TORCH_CHECK(z.dim() >= 2 && z.size(0) > 0 && z.size(0) % 2 == 0,
              "sgr_ext_cpp.dual_bn: ", name, " must be (2n, C, *spatial) with n >= 1, got shape ", z.sizes());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "sgr_ext_cpp.dual_bn: float16/bfloat16/float32/float64 expected, got ", t);
}

// Element (row, channel, position) addressing of a (2n, C, S) view; `half` is the offset of
// the tangent rows from the primal ones.
struct Layout {
  int64_t n, S, s_n, s_c, s_s, half;
  explicit Layout(const at::Tensor& t3)
      : n(t3.size(0) / 2), S(t3.size(2)), s_n(t3.stride(0)), s_c(t3.stride(1)), s_s(t3.stride(2)),
        half(t3.size(0) / 2 * t3.stride(0)) {}
  int64_t at(int64_t i, int64_t c) const { return i * s_n + c * s_c; }
};

// Per-element arithmetic: float for float / half / bfloat16 inputs (on centred values, so
// nothing cancels), double for double. Every sum accumulates in double.
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename op_t>
struct Coef {
  op_t mean, rstd, mt, s, a, beta, d;
};

template <typename op_t, typename acc_t>
Coef<op_t> read_coef(const acc_t* st, int64_t C, int64_t c) {
  auto r = [&](int row) { return static_cast<op_t>(st[row * C + c]); };
  return {r(kMean), r(kRstd), r(kMt), r(kS), r(kA), r(kBeta), r(kD)};
}

// Channel c's loops run over rows i and positions j. kUnit: every tensor has unit stride
// along j (NCHW), a compile-time constant there so that the inner loops vectorise.
#define SGR_UNIT_STRIDE(COND, ...)  \
  if (COND) {                       \
    constexpr bool kUnit = true;    \
    __VA_ARGS__                     \
  } else {                          \
    constexpr bool kUnit = false;   \
    __VA_ARGS__                     \
  }

template <typename scalar_t, typename acc_t>
void apply_impl(const at::Tensor& z3, at::Tensor& out3, const at::Tensor& stats, bool relu) {
  using op_t = opmath_t<scalar_t>;
  const Layout L(z3), O(out3);
  const scalar_t* zp = z3.data_ptr<scalar_t>();
  scalar_t* op = out3.data_ptr<scalar_t>();
  const int64_t C = z3.size(1);
  const acc_t* st = stats.data_ptr<acc_t>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Coef<op_t> k = read_coef<op_t>(st, C, c);
      for (int64_t i = 0; i < L.n; ++i) {
        const scalar_t* x = zp + L.at(i, c);
        const scalar_t* t = x + L.half;
        scalar_t* y = op + O.at(i, c);
        scalar_t* yt = y + O.half;
        SGR_UNIT_STRIDE(L.s_s == 1 && O.s_s == 1, {
          const int64_t ss = kUnit ? 1 : L.s_s, oss = kUnit ? 1 : O.s_s;
          _Pragma("omp simd")
          for (int64_t j = 0; j < L.S; ++j) {
            const op_t xc = static_cast<op_t>(x[j * ss]) - k.mean;
            const op_t p = k.a * xc + k.beta;
            const op_t q = k.a * (static_cast<op_t>(t[j * ss]) - k.mt) + k.d * xc;
            const bool on = !relu || p > op_t(0);
            y[j * oss] = static_cast<scalar_t>(on ? p : op_t(0));
            yt[j * oss] = static_cast<scalar_t>(on ? q : op_t(0));
          }
        })
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> empty_out(const at::Tensor& z) {
  at::Tensor z3 = as3d(z);
  at::Tensor out3 = at::empty_like(z3);  // z3's dense layout, so splitting S back is a view
  return {z3, out3};
}

void check_stats(const at::Tensor& stats, const at::Tensor& z) {
  const auto acc = acc_type(z.scalar_type());
  TORCH_CHECK(stats.scalar_type() == acc && stats.dim() == 2 && stats.size(0) == kRows && stats.size(1) == z.size(1),
              "sgr_ext_cpp.dual_bn: stats must be (", kRows, ", ", z.size(1), ") ", acc, ", got ", stats.sizes(), " ",
              stats.scalar_type());
}

at::Tensor dual_bn_apply_cpu(const at::Tensor& z, const at::Tensor& stats, bool relu) {
  check_packed(z, "z");
  check_stats(stats, z);
  auto [z3, out3] = empty_out(z);
  const at::Tensor st = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_bn_apply", [&] {
    if (z.scalar_type() == at::kDouble) {
      apply_impl<scalar_t, double>(z3, out3, st, relu);
    } else {
      apply_impl<scalar_t, float>(z3, out3, st, relu);
    }
  });
  return out3.view(z.sizes());
}

at::Tensor channel_doubles(const c10::optional<at::Tensor>& v, int64_t C, double fallback) {
  if (!v.has_value()) return at::full({C}, fallback, at::dtype(at::kDouble));
  TORCH_CHECK(v->dim() == 1 && v->size(0) == C, "sgr_ext_cpp.dual_bn: weight/bias must be (", C, "), got ", v->sizes());
  return v->to(at::kDouble).contiguous();
}

template <typename scalar_t, typename acc_t>
void stats_impl(const at::Tensor& z3, const double* gam, const double* bet, double eps, at::Tensor& stats) {
  const Layout L(z3);
  const scalar_t* zp = z3.data_ptr<scalar_t>();
  const int64_t C = z3.size(1);
  const double N = static_cast<double>(L.n * L.S);
  acc_t* st = stats.data_ptr<acc_t>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sx = 0.0, stt = 0.0;
      for (int64_t i = 0; i < L.n; ++i) {
        const scalar_t* x = zp + L.at(i, c);
        const scalar_t* t = x + L.half;
        SGR_UNIT_STRIDE(L.s_s == 1, {
          const int64_t ss = kUnit ? 1 : L.s_s;
          _Pragma("omp simd reduction(+ : sx, stt)")
          for (int64_t j = 0; j < L.S; ++j) {
            sx += static_cast<double>(x[j * ss]);
            stt += static_cast<double>(t[j * ss]);
          }
        })
      }
      const double mean = sx / N, mt = stt / N;
      double m2 = 0.0, cx = 0.0;
      for (int64_t i = 0; i < L.n; ++i) {
        const scalar_t* x = zp + L.at(i, c);
        const scalar_t* t = x + L.half;
        SGR_UNIT_STRIDE(L.s_s == 1, {
          const int64_t ss = kUnit ? 1 : L.s_s;
          _Pragma("omp simd reduction(+ : m2, cx)")
          for (int64_t j = 0; j < L.S; ++j) {
            const double xc = static_cast<double>(x[j * ss]) - mean;
            m2 += xc * xc;
            cx += xc * (static_cast<double>(t[j * ss]) - mt);
          }
        })
      }
      const double rstd = 1.0 / std::sqrt(m2 / N + eps);
      const double s = cx / N * rstd;
      const double a = gam[c] * rstd;
      const double row[kRows] = {mean, rstd, mt, s, a, bet[c], -a * rstd * s};
      for (int r = 0; r < kRows; ++r) st[r * C + c] = static_cast<acc_t>(row[r]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dual_bn_fwd_cpu(const at::Tensor& z, const c10::optional<at::Tensor>& weight,
                                                   const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  check_packed(z, "z");
  const int64_t C = z.size(1);
  const at::Tensor gam = channel_doubles(weight, C, 1.0), bet = channel_doubles(bias, C, 0.0);
  const auto acc = acc_type(z.scalar_type());
  at::Tensor stats = at::empty({kRows, C}, z.options().dtype(acc));
  const at::Tensor z3 = as3d(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_bn_fwd", [&] {
    if (acc == at::kDouble) {
      stats_impl<scalar_t, double>(z3, gam.data_ptr<double>(), bet.data_ptr<double>(), eps, stats);
    } else {
      stats_impl<scalar_t, float>(z3, gam.data_ptr<double>(), bet.data_ptr<double>(), eps, stats);
    }
  });
  return {dual_bn_apply_cpu(z, stats, relu), stats};
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const at::Tensor& z3, const at::Tensor& g3, at::Tensor& gz3, const double* gam, const at::Tensor& stats,
              bool relu, double* g_w, double* g_b) {
  using op_t = opmath_t<scalar_t>;
  const Layout L(z3), G(g3), O(gz3);
  const scalar_t* zp = z3.data_ptr<scalar_t>();
  const scalar_t* gp = g3.data_ptr<scalar_t>();
  scalar_t* op = gz3.data_ptr<scalar_t>();
  const int64_t C = z3.size(1);
  const double N = static_cast<double>(L.n * L.S);
  const acc_t* st = stats.data_ptr<acc_t>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Coef<op_t> k = read_coef<op_t>(st, C, c);
      const op_t zero(0);
      // the incoming gradients are zeroed where the forward's ReLU was off (mask recomputed
      // with apply_impl's expression)
      double sg = 0.0, sgx = 0.0, sgt = 0.0, sgtx = 0.0, sgtt = 0.0;
      for (int64_t i = 0; i < L.n; ++i) {
        const scalar_t* x = zp + L.at(i, c);
        const scalar_t* t = x + L.half;
        const scalar_t* gy = gp + G.at(i, c);
        const scalar_t* gt = gy + G.half;
        SGR_UNIT_STRIDE(L.s_s == 1 && G.s_s == 1, {
          const int64_t ss = kUnit ? 1 : L.s_s, gs = kUnit ? 1 : G.s_s;
          // sums over chunks of kChunk positions in op_t (they vectorise), added up in double
          for (int64_t j0 = 0; j0 < L.S; j0 += kChunk) {
            const int64_t j1 = std::min(L.S, j0 + kChunk);
            op_t r0 = 0, r1 = 0, r2 = 0, r3 = 0, r4 = 0;
            _Pragma("omp simd reduction(+ : r0, r1, r2, r3, r4)")
            for (int64_t j = j0; j < j1; ++j) {
              const op_t xc = static_cast<op_t>(x[j * ss]) - k.mean;
              const op_t g1v = static_cast<op_t>(gy[j * gs]), g2v = static_cast<op_t>(gt[j * gs]);
              const bool on = !relu || k.a * xc + k.beta > zero;
              const op_t g1 = on ? g1v : zero, g2 = on ? g2v : zero;  // loads first: a blend, not a branch
              r0 += g1;
              r1 += g1 * xc;
              r2 += g2;
              r3 += g2 * xc;
              r4 += g2 * (static_cast<op_t>(t[j * ss]) - k.mt);
            }
            sg += r0;
            sgx += r1;
            sgt += r2;
            sgtx += r3;
            sgtt += r4;
          }
        })
      }
      const double r = static_cast<double>(k.rstd), sv = static_cast<double>(k.s);
      const double gm = sg / N, gxh = sgx * r / N, gtm = sgt / N, gtxh = sgtx * r / N;
      const double T = sgtt / N - gtxh * sv;  // mean(gyt P t)
      const double gr = gam[c] * r, gr2 = gr * r;
      const op_t k1 = static_cast<op_t>(gr), k2 = static_cast<op_t>(-gr2 * sv), k3 = static_cast<op_t>(-gr2 * gtxh);
      const op_t kx = static_cast<op_t>((-gr * gxh + 2.0 * gr2 * sv * gtxh - gr2 * T) * r);
      const op_t k0 = static_cast<op_t>(-gr * gm + gr2 * sv * gtm), k8 = static_cast<op_t>(-gr * gtm);
      for (int64_t i = 0; i < L.n; ++i) {
        const scalar_t* x = zp + L.at(i, c);
        const scalar_t* t = x + L.half;
        const scalar_t* gy = gp + G.at(i, c);
        const scalar_t* gt = gy + G.half;
        scalar_t* ox = op + O.at(i, c);
        scalar_t* ot = ox + O.half;
        SGR_UNIT_STRIDE(L.s_s == 1 && G.s_s == 1 && O.s_s == 1, {
          const int64_t ss = kUnit ? 1 : L.s_s, gs = kUnit ? 1 : G.s_s, os = kUnit ? 1 : O.s_s;
          _Pragma("omp simd")
          for (int64_t j = 0; j < L.S; ++j) {
            const op_t xc = static_cast<op_t>(x[j * ss]) - k.mean;
            const op_t g1v = static_cast<op_t>(gy[j * gs]), g2v = static_cast<op_t>(gt[j * gs]);
            const bool on = !relu || k.a * xc + k.beta > zero;
            const op_t g1 = on ? g1v : zero, g2 = on ? g2v : zero;  // loads first: a blend, not a branch
            const op_t tc = static_cast<op_t>(t[j * ss]) - k.mt;
            ox[j * os] = static_cast<scalar_t>(k1 * g1 + k2 * g2 + k3 * tc + kx * xc + k0);
            ot[j * os] = static_cast<scalar_t>(k1 * g2 + k3 * xc + k8);
          }
        })
      }
      g_w[c] = sgx * r + N * r * T;
      g_b[c] = sg;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_bn_bwd_cpu(const at::Tensor& z, const at::Tensor& grad,
                                                               const c10::optional<at::Tensor>& weight,
                                                               const at::Tensor& stats, bool relu) {
  check_packed(z, "z");
  check_packed(grad, "grad");
  TORCH_CHECK(grad.sizes() == z.sizes() && grad.scalar_type() == z.scalar_type(),
              "sgr_ext_cpp.dual_bn: grad must match z, got ", grad.sizes(), " ", grad.scalar_type(), " vs ", z.sizes(),
              " ", z.scalar_type());
  check_stats(stats, z);
  const int64_t C = z.size(1);
  const at::Tensor gam = channel_doubles(weight, C, 1.0);
  auto [z3, gz3] = empty_out(z);
  const at::Tensor g3 = as3d(grad), st = stats.contiguous();
  at::Tensor gwb = at::empty({2, C}, at::dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_bn_bwd", [&] {
    double* pw = gwb.data_ptr<double>();
    if (z.scalar_type() == at::kDouble) {
      bwd_impl<scalar_t, double>(z3, g3, gz3, gam.data_ptr<double>(), st, relu, pw, pw + C);
    } else {
      bwd_impl<scalar_t, float>(z3, g3, gz3, gam.data_ptr<double>(), st, relu, pw, pw + C);
    }
  });
  gwb = gwb.to(acc_type(z.scalar_type()));
  return {gz3.view(z.sizes()), gwb[0].clone(), gwb[1].clone()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgr_ext_cpp, m) {
  m.def("dual_bn_fwd(Tensor z, Tensor? weight, Tensor? bias, float eps, bool relu) -> (Tensor, Tensor)");
  m.def("dual_bn_apply(Tensor z, Tensor stats, bool relu) -> Tensor");
  m.def("dual_bn_bwd(Tensor z, Tensor grad, Tensor? weight, Tensor stats, bool relu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgr_ext_cpp, CPU, m) {
  m.impl("dual_bn_fwd", &dual_bn_fwd_cpu);
  m.impl("dual_bn_apply", &dual_bn_apply_cpu);
  m.impl("dual_bn_bwd", &dual_bn_bwd_cpu);
}
