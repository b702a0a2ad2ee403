// CPU kernels of the fused linear + softmax cross-entropy head (see sgr_ext/ops/linear_ce.py).
//
//   z_i = x_i W^T + b,  lse_i = log sum_v exp(z_iv),  loss_i = lse_i - z_{i,y_i}
//   dz_i = c_i (softmax(z_i) - e_{y_i});  dx = dz W;  dW = dz^T x;  db = sum_i dz_i
//
// The (N, V) logits are never stored. Rows go in chunks of kRows, classes in chunks of
// kCols: each (kRows x kCols) logits tile is one BLAS product in the accumulate type
// (at::mm: float for float/half/bfloat16 inputs, double for double), and every pass over a
// tile (online log-sum-exp, gradient) runs with OpenMP over its rows. The backward
// recomputes the tiles from the saved per-row lse. Rows with c_i = 0 (ignored targets) are
// skipped by the backward whenever a whole row chunk is ignored.
//
// Ops (namespace sgr_ext_cpp, CPU only):
//   linear_ce_forward(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index)
//       -> (Tensor loss_rows, Tensor lse)        (N,) each, accumulate dtype; loss 0 on ignored rows
//   linear_ce_backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index,
//                      Tensor lse, Tensor row_scale, bool need_dx, bool need_dw, bool need_db)
//       -> (Tensor dx, Tensor dw, Tensor db)     in the dtypes of x / weight / bias; empty where
//                                                not needed. row_scale: c_i (N,), accumulate dtype,
//                                                treated as 0 on ignored rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kRows = 256;   // rows per chunk
constexpr int64_t kCols = 2048;  // classes per chunk: a tile is at most 2 MiB of float

int num_threads() { return std::max(1, at::get_num_threads()); }

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target, int64_t ignore_index) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && target.device().is_cpu(),
              "sgr_ext_cpp.linear_ce: CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_ce: x (N, H), weight (V, H) expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && target.is_contiguous(), "linear_ce: contiguous inputs expected");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && w.scalar_type() == x.scalar_type(),
              "linear_ce: floating x and weight of one dtype expected");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == x.size(0),
              "linear_ce: target (N,) int64 expected");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == w.size(0) &&
                    bias->device().is_cpu(),
                "linear_ce: bias (V,) of x's dtype expected");
  }
  const int64_t V = w.size(0);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), "linear_ce: target[", i, "] = ", t[i],
                " is outside [0, ", V, ") and is not ignore_index");
  }
}

// The logits tile z = x_c W_c^T + b_c in the accumulate type; (rows, cols), contiguous.
at::Tensor logits_tile(const at::Tensor& xa, const at::Tensor& wa, const std::optional<at::Tensor>& ba) {
  at::Tensor z = at::mm(xa, wa.t());
  if (ba.has_value()) z.add_(*ba);
  return z;
}

template <typename acc_t>
void forward_rows(const at::Tensor& z, int64_t v0, const int64_t* tgt, acc_t* m, acc_t* s, acc_t* zy) {
  // online log-sum-exp update of every row of one tile; OpenMP over rows
  const int64_t rows = z.size(0), cols = z.size(1);
  const acc_t* zp = z.data_ptr<acc_t>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* zr = zp + r * cols;
    acc_t mb = zr[0];
    for (int64_t v = 1; v < cols; ++v) mb = std::max(mb, zr[v]);
    const acc_t m_new = std::max(m[r], mb);
    acc_t sb = 0;
    for (int64_t v = 0; v < cols; ++v) sb += std::exp(zr[v] - m_new);
    s[r] = s[r] * std::exp(m[r] - m_new) + sb;
    m[r] = m_new;
    const int64_t y = tgt[r];
    if (y >= v0 && y < v0 + cols) zy[r] = zr[y - v0];
  }
}

template <typename acc_t>
void grad_rows(at::Tensor& z, int64_t v0, const int64_t* tgt, const acc_t* lse, const acc_t* c) {
  // z <- c_r (exp(z - lse_r) - [v == y_r]) in place; OpenMP over rows
  const int64_t rows = z.size(0), cols = z.size(1);
  acc_t* zp = z.data_ptr<acc_t>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* zr = zp + r * cols;
    const acc_t cr = c[r], l = lse[r];
    if (cr == acc_t(0)) {
      std::fill(zr, zr + cols, acc_t(0));
      continue;
    }
    for (int64_t v = 0; v < cols; ++v) zr[v] = cr * std::exp(zr[v] - l);
    const int64_t y = tgt[r];
    if (y >= v0 && y < v0 + cols) zr[y - v0] -= cr;
  }
}

template <typename acc_t>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target, int64_t ignore_index, at::Tensor& loss, at::Tensor& lse) {
  const int64_t N = x.size(0), V = weight.size(0);
  const auto acc = acc_type_of(x.scalar_type());
  const int64_t* tp = target.data_ptr<int64_t>();
  acc_t* lossp = loss.data_ptr<acc_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  std::vector<acc_t> m(kRows), s(kRows), zy(kRows);
  for (int64_t r0 = 0; r0 < N; r0 += kRows) {
    const int64_t nr = std::min(kRows, N - r0);
    const at::Tensor xa = x.narrow(0, r0, nr).to(acc).contiguous();
    std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
    std::fill(s.begin(), s.end(), acc_t(0));
    std::fill(zy.begin(), zy.end(), acc_t(0));
    for (int64_t v0 = 0; v0 < V; v0 += kCols) {
      const int64_t nv = std::min(kCols, V - v0);
      const at::Tensor wa = weight.narrow(0, v0, nv).to(acc);
      std::optional<at::Tensor> ba;
      if (bias.has_value()) ba = bias->narrow(0, v0, nv).to(acc);
      const at::Tensor z = logits_tile(xa, wa, ba);
      forward_rows<acc_t>(z, v0, tp + r0, m.data(), s.data(), zy.data());
    }
    for (int64_t r = 0; r < nr; ++r) {
      const acc_t l = m[r] + std::log(s[r]);
      lsep[r0 + r] = l;
      lossp[r0 + r] = tp[r0 + r] == ignore_index ? acc_t(0) : l - zy[r];
    }
  }
}

template <typename acc_t>
void backward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& target, int64_t ignore_index, const at::Tensor& lse,
                   const at::Tensor& row_scale, at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  const int64_t N = x.size(0), V = weight.size(0);
  const auto acc = acc_type_of(x.scalar_type());
  const int64_t* tp = target.data_ptr<int64_t>();
  const acc_t* lsep = lse.data_ptr<acc_t>();
  std::vector<acc_t> c(N);
  const acc_t* cs = row_scale.data_ptr<acc_t>();
  for (int64_t i = 0; i < N; ++i) c[i] = tp[i] == ignore_index ? acc_t(0) : cs[i];
  for (int64_t r0 = 0; r0 < N; r0 += kRows) {
    const int64_t nr = std::min(kRows, N - r0);
    if (std::all_of(c.begin() + r0, c.begin() + r0 + nr, [](acc_t v) { return v == acc_t(0); })) continue;
    const at::Tensor xa = x.narrow(0, r0, nr).to(acc).contiguous();
    for (int64_t v0 = 0; v0 < V; v0 += kCols) {
      const int64_t nv = std::min(kCols, V - v0);
      const at::Tensor wa = weight.narrow(0, v0, nv).to(acc);
      std::optional<at::Tensor> ba;
      if (bias.has_value()) ba = bias->narrow(0, v0, nv).to(acc);
      at::Tensor z = logits_tile(xa, wa, ba);
      grad_rows<acc_t>(z, v0, tp + r0, lsep + r0, c.data() + r0);
      if (dx.defined()) dx.narrow(0, r0, nr).addmm_(z, wa);
      if (dw.defined()) dw.narrow(0, v0, nv).addmm_(z.t(), xa);
      if (db.defined()) db.narrow(0, v0, nv).add_(z.sum(0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> linear_ce_forward(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                     int64_t ignore_index) {
  check_inputs(x, weight, bias, target, ignore_index);
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor loss = at::empty({x.size(0)}, x.options().dtype(acc));
  at::Tensor lse = at::empty({x.size(0)}, x.options().dtype(acc));
  if (acc == at::kDouble) {
    forward_impl<double>(x, weight, bias, target, ignore_index, loss, lse);
  } else {
    forward_impl<float>(x, weight, bias, target, ignore_index, loss, lse);
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, const at::Tensor& lse, const at::Tensor& row_scale, bool need_dx, bool need_dw,
    bool need_db) {
  check_inputs(x, weight, bias, target, ignore_index);
  const int64_t N = x.size(0), H = x.size(1), V = weight.size(0);
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.numel() == N && lse.is_contiguous(), "linear_ce: lse (N,) expected");
  TORCH_CHECK(row_scale.scalar_type() == acc && row_scale.numel() == N && row_scale.is_contiguous(),
              "linear_ce: row_scale (N,) expected");
  need_db = need_db && bias.has_value();
  const auto aopt = x.options().dtype(acc);
  // accumulators in the accumulate type, cast to the parameter dtypes at the end
  at::Tensor dx = need_dx ? at::zeros({N, H}, aopt) : at::Tensor();
  at::Tensor dw = need_dw ? at::zeros({V, H}, aopt) : at::Tensor();
  at::Tensor db = need_db ? at::zeros({V}, aopt) : at::Tensor();
  if (acc == at::kDouble) {
    backward_impl<double>(x, weight, bias, target, ignore_index, lse, row_scale, dx, dw, db);
  } else {
    backward_impl<float>(x, weight, bias, target, ignore_index, lse, row_scale, dx, dw, db);
  }
  return {
      need_dx ? dx.to(x.scalar_type()) : at::empty({0}, x.options()),
      need_dw ? dw.to(weight.scalar_type()) : at::empty({0}, weight.options()),
      need_db ? db.to(bias->scalar_type()) : at::empty({0}, x.options()),
  };
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgr_ext_cpp, m) {
  m.def("linear_ce_forward(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "linear_ce_backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, Tensor lse, "
      "Tensor row_scale, bool need_dx, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgr_ext_cpp, CPU, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_backward", &linear_ce_backward);
}
