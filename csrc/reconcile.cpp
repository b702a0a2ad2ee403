// CPU kernels of the SGR boundary penalty `reconcile` (see sgr_ext/ops/reconcile.py).
//
// Ops (namespace sgr_ext_cpp, CPU only; same contract as kernels/reconcile.py):
//   reconcile_fwd(Tensor a, Tensor d, str distance, float eps) -> (Tensor loss, Tensor stats)
//       a, d: (B, *) one float dtype. loss: 0-dim, stats: (B, S), both in the accumulate
//       dtype (double for double inputs, float otherwise). S = 1 for "l2" (|a_i - d_i|^2),
//       S = 3 for "cosine" (|a_i|^2, <a_i, d_i>, |d_i|^2).
//   reconcile_bwd(Tensor grad, Tensor a, Tensor d, Tensor stats, str distance, float eps) -> Tensor
//       grad: 0-dim incoming gradient of loss. Returns grad * d loss / d a, a's shape and dtype.
//
// Work is split into (sample, chunk) tasks of kChunk features, run with OpenMP; each task
// reads a and d once with a vectorisable inner loop (omp simd reduction). Partial sums are
// combined in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kChunk = 4096;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

bool is_cosine(c10::string_view distance) {
  const std::string s(distance.data(), distance.size());
  TORCH_CHECK(s == "l2" || s == "cosine",
              "sgr_ext_cpp.reconcile: distance must be 'l2' or 'cosine', got '", s, "'");
  return s == "cosine";
}

void check_pair(const at::Tensor& a, const at::Tensor& d) {
  TORCH_CHECK(a.device().is_cpu() && d.device().is_cpu(),
              "sgr_ext_cpp.reconcile: CPU tensors expected, got ", a.device(), " and ", d.device());
  TORCH_CHECK(a.dim() >= 1 && a.size(0) > 0,
              "sgr_ext_cpp.reconcile: a must have a non-empty batch dimension, got shape ", a.sizes());
  TORCH_CHECK(a.sizes() == d.sizes(), "sgr_ext_cpp.reconcile: a and d shapes differ: ", a.sizes(), " vs ",
              d.sizes());
  TORCH_CHECK(a.scalar_type() == d.scalar_type(), "sgr_ext_cpp.reconcile: a and d dtypes differ: ",
              a.scalar_type(), " vs ", d.scalar_type());
  const auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "sgr_ext_cpp.reconcile: float16/bfloat16/float32/float64 expected, got ", t);
}

// The loss: float64 for float64 inputs, else float32. The per-sample stats: the same for l2,
// float64 for cosine, whose |a|^2 leaves float32's range beyond |a| ~ 1e19 and below 1e-19
// although the cosine itself does not depend on the scale.
at::ScalarType loss_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
at::ScalarType stats_type(at::ScalarType t, bool cosine) { return cosine ? at::kDouble : loss_type(t); }

int num_threads() { return std::max(1, at::get_num_threads()); }

// part: (B, nc, S) partial sums of task (b, c).
template <typename scalar_t, typename acc_t, bool COSINE>
void fwd_partials(const scalar_t* a, const scalar_t* d, int64_t B, int64_t F, int64_t nc, acc_t* part) {
  constexpr int64_t S = COSINE ? 3 : 1;
  const int64_t tasks = B * nc;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (tasks > 1 && B * F > 32768)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / nc, c = t % nc;
    const int64_t lo = c * kChunk, hi = std::min(F, lo + kChunk);
    const scalar_t* pa = a + b * F;
    const scalar_t* pd = d + b * F;
    acc_t s0 = 0, s1 = 0, s2 = 0;
    if (COSINE) {
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t x = static_cast<acc_t>(pa[j]);
        const acc_t y = static_cast<acc_t>(pd[j]);
        s0 += x * x;
        s1 += x * y;
        s2 += y * y;
      }
    } else {
#pragma omp simd reduction(+ : s0)
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t z = static_cast<acc_t>(pa[j]) - static_cast<acc_t>(pd[j]);
        s0 += z * z;
      }
    }
    acc_t* out = part + t * S;
    out[0] = s0;
    if (COSINE) {
      out[1] = s1;
      out[2] = s2;
    }
  }
}

// acc_t: the stats' type (see stats_type)
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& a2, const at::Tensor& d2, bool cosine, double eps) {
  const int64_t B = a2.size(0), F = a2.size(1);
  const int64_t nc = std::max<int64_t>(1, (F + kChunk - 1) / kChunk);
  const int64_t S = cosine ? 3 : 1;
  std::vector<acc_t> part(static_cast<size_t>(B * nc * S));
  if (cosine) {
    fwd_partials<scalar_t, acc_t, true>(a2.data_ptr<scalar_t>(), d2.data_ptr<scalar_t>(), B, F, nc, part.data());
  } else {
    fwd_partials<scalar_t, acc_t, false>(a2.data_ptr<scalar_t>(), d2.data_ptr<scalar_t>(), B, F, nc, part.data());
  }
  at::Tensor stats = at::empty({B, S}, a2.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* st = stats.data_ptr<acc_t>();
  double total = 0.0;  // B scalars: summed in double, in order
  for (int64_t b = 0; b < B; ++b) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t k = 0; k < S; ++k) s[k] += static_cast<double>(part[(b * nc + c) * S + k]);
    for (int64_t k = 0; k < S; ++k) st[b * S + k] = static_cast<acc_t>(s[k]);
    if (cosine) {
      const acc_t aa = st[b * 3], ad = st[b * 3 + 1], dd = st[b * 3 + 2];
      const acc_t den = std::sqrt(aa) * std::sqrt(dd) + static_cast<acc_t>(eps);
      total += static_cast<double>(acc_t(1) - ad / den);
    } else {
      total += static_cast<double>(st[b]);
    }
  }
  at::Tensor loss = at::scalar_tensor(total / static_cast<double>(B), a2.options().dtype(at::kDouble));
  return {loss.to(loss_type(a2.scalar_type())), stats};
}

std::tuple<at::Tensor, at::Tensor> reconcile_fwd_cpu(const at::Tensor& a, const at::Tensor& d,
                                                     c10::string_view distance, double eps) {
  check_pair(a, d);
  const bool cosine = is_cosine(distance);
  const int64_t B = a.size(0);
  const at::Tensor a2 = a.reshape({B, -1}).contiguous();
  const at::Tensor d2 = d.reshape({B, -1}).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sgr_ext_cpp.reconcile_fwd",
                                  [&] {
                                    using acc_t = typename Acc<scalar_t>::type;
                                    out = cosine ? fwd_impl<scalar_t, double>(a2, d2, true, eps)
                                                 : fwd_impl<scalar_t, acc_t>(a2, d2, false, eps);
                                  });
  return out;
}

// acc_t: the stats' type (see stats_type)
template <typename scalar_t, typename acc_t>
void bwd_impl(const at::Tensor& a2, const at::Tensor& d2, const at::Tensor& stats, double g, bool cosine, double eps,
              at::Tensor& out) {
  const int64_t B = a2.size(0), F = a2.size(1);
  const int64_t nc = std::max<int64_t>(1, (F + kChunk - 1) / kChunk);
  const acc_t gb = static_cast<acc_t>(g / static_cast<double>(B));
  // per-sample coefficients: grad_i = ca_i * a_i + cd_i * d_i (l2: 2 g/B (a_i - d_i))
  std::vector<acc_t> ca(static_cast<size_t>(B)), cd(static_cast<size_t>(B));
  if (cosine) {
    const acc_t* st = stats.data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    for (int64_t b = 0; b < B; ++b) {
      const acc_t na = std::sqrt(st[b * 3]), ad = st[b * 3 + 1], nd = std::sqrt(st[b * 3 + 2]);
      const acc_t den = na * nd + e;
      cd[b] = -gb / den;
      // (ad/den) (nd/den) / na, not ad nd / (den^2 na): den^2 overflows float from |a||d| ~ 2e19
      ca[b] = na > 0 ? gb * (ad / den) * (nd / den) / na : acc_t(0);
    }
  }
  const scalar_t* a = a2.data_ptr<scalar_t>();
  const scalar_t* d = d2.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t tasks = B * nc;
  const acc_t two_g = acc_t(2) * gb;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (tasks > 1 && B * F > 32768)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / nc, c = t % nc;
    const int64_t lo = b * F + c * kChunk, hi = b * F + std::min(F, c * kChunk + kChunk);
    if (cosine) {
      const acc_t x_coef = ca[b], y_coef = cd[b];
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j)
        o[j] = static_cast<scalar_t>(x_coef * static_cast<acc_t>(a[j]) + y_coef * static_cast<acc_t>(d[j]));
    } else {
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j)
        o[j] = static_cast<scalar_t>(two_g * (static_cast<acc_t>(a[j]) - static_cast<acc_t>(d[j])));
    }
  }
}

at::Tensor reconcile_bwd_cpu(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& d,
                             const at::Tensor& stats, c10::string_view distance, double eps) {
  check_pair(a, d);
  const bool cosine = is_cosine(distance);
  const int64_t B = a.size(0);
  const auto acc = stats_type(a.scalar_type(), cosine);
  TORCH_CHECK(grad.numel() == 1, "sgr_ext_cpp.reconcile_bwd: grad must have one element, got shape ",
              grad.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == B && stats.size(1) == (cosine ? 3 : 1),
              "sgr_ext_cpp.reconcile_bwd: stats must have shape (", B, ", ", cosine ? 3 : 1, "), got ",
              stats.sizes());
  const double g = grad.item<double>();
  const at::Tensor a2 = a.reshape({B, -1}).contiguous();
  const at::Tensor d2 = d.reshape({B, -1}).contiguous();
  const at::Tensor st = stats.to(acc).contiguous();
  at::Tensor out = at::empty_like(a2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sgr_ext_cpp.reconcile_bwd",
                                  [&] {
                                    using acc_t = typename Acc<scalar_t>::type;
                                    if (cosine) {
                                      bwd_impl<scalar_t, double>(a2, d2, st, g, true, eps, out);
                                    } else {
                                      bwd_impl<scalar_t, acc_t>(a2, d2, st, g, false, eps, out);
                                    }
                                  });
  return out.view(a.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgr_ext_cpp, m) {
  m.def("reconcile_fwd(Tensor a, Tensor d, str distance, float eps) -> (Tensor, Tensor)");
  m.def("reconcile_bwd(Tensor grad, Tensor a, Tensor d, Tensor stats, str distance, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgr_ext_cpp, CPU, m) {
  m.impl("reconcile_fwd", &reconcile_fwd_cpu);
  m.impl("reconcile_bwd", &reconcile_bwd_cpu);
}
