// Fused sigmoid (SigLIP) loss on the CPU: the n x N logits never exist in memory.
//
// Op (what fastclip.ops.sigmoid_loss computes), with z = s * q k^T + b, q [n, D], k [N, D]:
//   loss_sum = sum_ij softplus(-y_ij z_ij),   y_ij = +1 if j == i + offset else -1
// (open_clip's -logsigmoid(labels * logits) summed; an offset >= N means no positive pair: another rank's texts).
// With with_grad, the same pass also returns the gradient of loss_sum (the loss is a scalar, so its backward is
// a scale of these; one pass costs 3 GEMMs, 6 n N D, instead of a forward and a recomputing backward, 8 n N D):
//   dz_ij = -y_ij sigmoid(-y_ij z_ij);   dq = s dz k,   dk = s dz^T q,   ds = sum dz * (q_i . k_j),   db = sum dz
//
// Schedule (as csrc/contrastive_lse.cpp): row blocks of BR spread over threads, each streaming column blocks of
// BC through one BR x BC fp32 tile that stays in L2: the GEMM, then softplus (and dz, in place) elementwise,
// then dq_blk += dz k_blk and dk_t += dz^T q_blk. dk partials are per thread (T x N x D fp32), summed at the end.
// Extra memory O((T + 1) N D); inputs fp32 / bf16 / fp16 converted once to fp32; results fp32.

#include "cpu_vec.h"  // first: it sets the SIMD width at::vec compiles for

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kRows = 256;
constexpr int64_t kCols = 1024;
using Vec = at::vec::Vectorized<float>;

void check_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "sigmoid_loss (C++): q and k must be CPU tensors, got ",
              q.device(), " and ", k.device());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1),
              "sigmoid_loss: q must be [n, D] and k [N, D] with one D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(0) > 0 && k.size(0) > 0, "sigmoid_loss: q and k need at least one row, got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "sigmoid_loss: q and k must have one dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "sigmoid_loss: features must be float32, bfloat16 or float16, got ", dt);
}

// log1p(e) for e in [0, 1], vectorized: 2 atanh(u) with u = e / (2 + e) in [0, 1/3], its odd series to u^17
// (truncation below 3e-10 relative). Sleef's general log1p cost 8 ns an element here, as much as the tile's GEMM.
inline Vec log1p_unit(const Vec& e) {
  const Vec u = e / (Vec(2.f) + e);
  const Vec u2 = u * u;
  Vec p(1.f / 17);
  for (float c : {1.f / 15, 1.f / 13, 1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3}) p = at::vec::fmadd(p, u2, Vec(c));
  return Vec(2.f) * at::vec::fmadd(u * u2, p, u);
}

struct Sums {
  double loss = 0, ds = 0, db = 0;
};

// Columns [j0, j1) of one tile row, all negatives (y = -1, so -y z = z): softplus(z) into the loss; with grad,
// dz = sigmoid(z) replaces raw in place. softplus(t) = max(t, 0) + log1p(e), sigmoid(t) = 1 / (1 + e) for t >= 0
// and e / (1 + e) below, with e = exp(-|t|) <= 1: one exponential for both, no overflow.
void negatives(float* row, int64_t j0, int64_t j1, float s, float b, bool with_grad, Sums& out) {
  const Vec vs(s), vb(b), one(1.f), zero(0.f);
  Vec vloss(0.f), vds(0.f), vdb(0.f);
  int64_t j = j0;
  for (; j + Vec::size() <= j1; j += Vec::size()) {
    const Vec raw = Vec::loadu(row + j);
    const Vec t = raw * vs + vb;
    const Vec e = t.abs().neg().exp();
    vloss = vloss + at::vec::maximum(t, zero) + log1p_unit(e);
    if (with_grad) {
      const Vec r = one / (one + e);
      const Vec dz = Vec::blendv(e * r, r, t >= zero);
      vds = vds + dz * raw;
      vdb = vdb + dz;
      dz.store(row + j);
    }
  }
  auto sum = [](const Vec& v) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, v); };
  out.loss += sum(vloss);
  out.ds += sum(vds);
  out.db += sum(vdb);
  for (; j < j1; ++j) {
    const float raw = row[j], t = raw * s + b, e = std::exp(-std::fabs(t));
    out.loss += std::max(t, 0.f) + std::log1p(e);
    if (with_grad) {
      const float dz = t >= 0 ? 1.f / (1.f + e) : e / (1.f + e);
      out.ds += static_cast<double>(dz) * raw;
      out.db += dz;
      row[j] = dz;
    }
  }
}

// One tile of raw q_i . k_j (R rows x C columns, row stride ld); the positive of row i is column i + pos (if any).
Sums tile_sums(float* T, int64_t R, int64_t C, int64_t ld, float s, float b, int64_t pos, bool with_grad) {
  Sums out;
  for (int64_t i = 0; i < R; ++i) {
    float* row = T + i * ld;
    const int64_t jp = i + pos;
    if (jp < 0 || jp >= C) {
      negatives(row, 0, C, s, b, with_grad, out);
      continue;
    }
    negatives(row, 0, jp, s, b, with_grad, out);
    negatives(row, jp + 1, C, s, b, with_grad, out);
    const float raw = row[jp], t = -(raw * s + b), e = std::exp(-std::fabs(t));  // y = +1: softplus(-z)
    out.loss += std::max(t, 0.f) + std::log1p(e);
    if (with_grad) {
      const float dz = -(t >= 0 ? 1.f / (1.f + e) : e / (1.f + e));  // -sigmoid(-z)
      out.ds += static_cast<double>(dz) * raw;
      out.db += dz;
      row[jp] = dz;
    }
  }
  return out;
}

}  // namespace

// Returns (loss_sum [] fp32, dq [n, D], dk [N, D], dscale_dbias [2]), fp32; without grad the last three are [1].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_forward(const at::Tensor& q_in,
                                                                            const at::Tensor& k_in, double scale,
                                                                            double bias, int64_t offset,
                                                                            bool with_grad) {
  check_inputs(q_in, k_in);
  at::NoGradGuard no_grad;  // called below autograd (custom op); the tiles are plain buffers
  const int64_t n = q_in.size(0), N = k_in.size(0), D = q_in.size(1);
  at::Tensor q = q_in.detach().to(at::kFloat).contiguous();
  at::Tensor k = k_in.detach().to(at::kFloat).contiguous();
  const float s = static_cast<float>(scale), b = static_cast<float>(bias);
  const int64_t row_blocks = (n + kRows - 1) / kRows;
  // at::parallel_for runs at most one thread per row block: per-thread buffers (dk: N x D each) for those only
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), row_blocks);
  at::Tensor dq = with_grad ? at::zeros({n, D}, q.options()) : at::empty({0}, q.options());
  at::Tensor dk_parts = at::zeros({with_grad ? threads : 0, N, D}, q.options());
  std::vector<Sums> parts(threads);

  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    TORCH_CHECK(t < threads, "sigmoid_loss: thread ", t, " of a parallel_for over ", row_blocks, " row blocks");
    at::Tensor tile_buf = at::empty({kRows, kCols}, q.options());
    Sums acc;
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kRows, rows = std::min(kRows, n - r0);
      at::Tensor q_blk = q.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < N; c0 += kCols) {
        const int64_t cols = std::min(kCols, N - c0);
        at::Tensor k_blk = k.narrow(0, c0, cols);
        at::Tensor tile = tile_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(tile, q_blk, k_blk.t());
        // the positive of global row r0 + i is column r0 + i + offset, i.e. tile column i + (r0 + offset - c0);
        // an offset >= N (no positives) lands past every tile's last column
        const int64_t pos = offset >= N ? cols : r0 + offset - c0;
        Sums part = tile_sums(tile.data_ptr<float>(), rows, cols, tile.stride(0), s, b, pos, with_grad);
        acc.loss += part.loss;
        acc.ds += part.ds;
        acc.db += part.db;
        if (with_grad) {
          dq.narrow(0, r0, rows).addmm_(tile, k_blk);
          dk_parts[t].narrow(0, c0, cols).addmm_(tile.t(), q_blk);
        }
      }
    }
    parts[t].loss += acc.loss;
    parts[t].ds += acc.ds;
    parts[t].db += acc.db;
  });

  Sums total;
  for (const Sums& p : parts) {
    total.loss += p.loss;
    total.ds += p.ds;
    total.db += p.db;
  }
  at::Tensor loss = at::scalar_tensor(total.loss, q.options());
  if (!with_grad) {
    // 1-element placeholders: empty tensors share a null storage, and an op's outputs may not alias one another
    auto none = [&] { return at::zeros({1}, q.options()); };
    return {loss, none(), none(), none()};
  }
  at::Tensor dk = dk_parts.sum(0).mul_(s);
  dq.mul_(s);
  at::Tensor dsb = at::empty({2}, q.options());
  dsb[0] = total.ds;
  dsb[1] = total.db;
  return {loss, dq, dk, dsb};
}

void register_sigmoid_loss(pybind11::module& m) {
  m.def("sigmoid_forward", &sigmoid_forward, "fused sigmoid (SigLIP) loss sum and, with_grad, its gradients (CPU)",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("offset"), py::arg("with_grad"));
}
