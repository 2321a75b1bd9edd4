// Fused log-sum-exp of contrastive logits on the CPU: the N x N logits never exist in memory.
//
// Op (what fastclip.ops.contrastive_lse computes), with L = s * q k^T, q [n, D], k [N, D]:
//   row_lse[i] = log sum_j exp(L[i, j])          (image -> text direction when q = image features)
//   col_lse[j] = log sum_i exp(L[i, j])          (text -> image; only when with_col, n == N on one rank)
// Backward, given upstream g_row [n] and g_col [N] (either may be empty):
//   dL[i, j] = g_row[i] * exp(L[i, j] - row_lse[i]) + g_col[j] * exp(L[i, j] - col_lse[j])
//   dq = s * dL k,   dk = s * dL^T q,   ds = sum_ij dL[i, j] * (q_i . k_j)
// The contrastive loss adds the diagonal targets -s q_i . k_{i+off} outside (O(nD), plain autograd),
// so the fused part is only the LSE and its gradient (dL = g/(2n) (P_row + P_col) here; -2I there).
//
// Schedule: the rows are split into blocks of BR, each thread owns a range of row blocks and streams
// column blocks of BC through one BR x BC fp32 tile that stays in L2.
//   forward : 1 GEMM per tile (2 N^2 D FLOPs), online LSE per row; per-thread online LSE per column,
//             merged at the end (T x N floats).
//   backward: recompute the tile (2 N^2 D), dq += dL k and dk_t += dL^T q (4 N^2 D); dk partials are
//             per thread (T x N x D fp32) and summed at the end. Extra memory: O((T + 1) N D), never N^2.
// Inputs fp32 / bf16 / fp16 are converted once to fp32 (O(N D)); accumulation and results are fp32,
// gradients are returned in the input dtype.

#include "cpu_vec.h"  // first: it sets the SIMD width at::vec compiles for

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 256;
constexpr int64_t kBlockCols = 1024;

void check_features(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "contrastive_lse (C++): q and k must be CPU tensors, got ",
              q.device(), " and ", k.device());
  TORCH_CHECK(q.dim() == 2, "contrastive_lse: q must be [n, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "contrastive_lse: k must be [N, D], got shape ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "contrastive_lse: q [n, D] and k [N, D] must share D, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.size(0) > 0 && k.size(0) > 0, "contrastive_lse: q and k need at least one row, got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "contrastive_lse: q and k must have one dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "contrastive_lse: features must be float32, bfloat16 or float16, got ", dt);
}

void check_vector(const at::Tensor& v, int64_t n, const char* name, const char* shape) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == n,
              "contrastive_lse_backward: ", name, " must be a float32 CPU vector ", shape, " of ", n,
              " values, got ", v.scalar_type(), " ", v.sizes());
}

// fp32 and contiguous; may alias the input, so never written to
// (detached: worker threads do not inherit the caller's no-grad mode)
at::Tensor as_float(const at::Tensor& x) { return x.detach().to(at::kFloat).contiguous(); }

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// NaN-propagating max (a NaN anywhere in a row must reach its LSE)
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

// One tile of the forward: rows [R] x cols [C] of L (row stride ld) update the running row statistics
// (m, l) and, with_col, the running column statistics (cm, cs):  m' = max(m, max_j L), l' = l e^(m - m')
// + sum_j e^(L - m'). Two passes over the tile (maxima, then exponentials), both in L2.
void tile_forward(const float* L, int64_t R, int64_t C, int64_t ld, float* m, float* l, float* cm, float* cs,
                  bool with_col, float* tile_cmax) {
  const int64_t vec_end = C - C % Vec::size();
  if (with_col) std::fill(tile_cmax, tile_cmax + C, kNegInf);
  for (int64_t i = 0; i < R; ++i) {
    const float* row = L + i * ld;
    Vec vmax(kNegInf);
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      Vec x = Vec::loadu(row + j);
      vmax = at::vec::maximum(vmax, x);
      if (with_col) at::vec::maximum(Vec::loadu(tile_cmax + j), x).store(tile_cmax + j);
    }
    float rmax = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    for (; j < C; ++j) {
      rmax = nan_max(row[j], rmax);
      if (with_col) tile_cmax[j] = nan_max(row[j], tile_cmax[j]);
    }
    const float m_new = nan_max(rmax, m[i]);
    l[i] *= std::exp(m[i] - m_new);  // 0 on the first tile: m = -inf
    m[i] = m_new;
  }
  if (with_col) {
    for (int64_t j = 0; j < C; ++j) {
      const float c_new = nan_max(tile_cmax[j], cm[j]);
      cs[j] *= std::exp(cm[j] - c_new);
      cm[j] = c_new;
    }
  }
  for (int64_t i = 0; i < R; ++i) {
    const float* row = L + i * ld;
    const Vec vm(m[i]);
    Vec vsum(0.f);
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      Vec x = Vec::loadu(row + j);
      vsum = vsum + (x - vm).exp();
      if (with_col) (Vec::loadu(cs + j) + (x - Vec::loadu(cm + j)).exp()).store(cs + j);
    }
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
    for (; j < C; ++j) {
      sum += std::exp(row[j] - m[i]);
      if (with_col) cs[j] += std::exp(row[j] - cm[j]);
    }
    l[i] += sum;
  }
}

// One tile of the backward, in place: raw = q_i . k_j becomes dL = g_r[i] e^(s raw - rl[i]) + g_c[j] e^(s raw -
// cl[j]); returns sum dL * raw (the logit-scale gradient's share). Absent sides have null pointers.
double tile_backward(float* T, int64_t R, int64_t C, int64_t ld, float s, const float* rl, const float* gr,
                     const float* cl, const float* gc) {
  const int64_t vec_end = C - C % Vec::size();
  const Vec vs(s);
  double ds = 0.0;
  for (int64_t i = 0; i < R; ++i) {
    float* row = T + i * ld;
    const Vec vrl(gr ? rl[i] : 0.f), vgr(gr ? gr[i] : 0.f);
    Vec vds(0.f);
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      const Vec raw = Vec::loadu(row + j);
      const Vec L = raw * vs;
      Vec d(0.f);
      if (gr) d = vgr * (L - vrl).exp();
      if (gc) d = d + Vec::loadu(gc + j) * (L - Vec::loadu(cl + j)).exp();
      vds = vds + d * raw;
      d.store(row + j);
    }
    double row_ds = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vds);
    for (; j < C; ++j) {
      const float raw = row[j], L = raw * s;
      float d = 0.f;
      if (gr) d = gr[i] * std::exp(L - rl[i]);
      if (gc) d += gc[j] * std::exp(L - cl[j]);
      row_ds += static_cast<double>(d) * raw;
      row[j] = d;
    }
    ds += row_ds;
  }
  return ds;
}

}  // namespace

// Returns (row_lse [n], col_lse [N] or [0]), float32.
std::tuple<at::Tensor, at::Tensor> lse_forward(const at::Tensor& q_in, const at::Tensor& k_in, double scale,
                                               bool with_col) {
  check_features(q_in, k_in);
  at::NoGradGuard no_grad;  // called below autograd (custom op); the tiles are plain buffers
  const int64_t n = q_in.size(0), N = k_in.size(0);
  at::Tensor q = q_in.detach().to(at::kFloat).mul(scale).contiguous();  // fold s into (a copy of) q: tiles come out as L
  at::Tensor k = as_float(k_in);
  at::Tensor row_lse = at::empty({n}, q.options());
  const int64_t row_blocks = (n + kBlockRows - 1) / kBlockRows;
  // at::parallel_for runs at most one thread per row block: per-thread buffers for those only
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), row_blocks);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // per-thread running column statistics, merged after the parallel region
  at::Tensor col_max = at::full({threads, with_col ? N : 0}, neg_inf, q.options());
  at::Tensor col_sum = at::zeros({threads, with_col ? N : 0}, q.options());

  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    TORCH_CHECK(t < threads, "contrastive_lse: thread ", t, " of a parallel_for over ", row_blocks, " row blocks");
    at::Tensor tile_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    std::vector<float> m(kBlockRows), l(kBlockRows), tile_cmax(kBlockCols);
    float* cm = with_col ? col_max[t].data_ptr<float>() : nullptr;
    float* cs = with_col ? col_sum[t].data_ptr<float>() : nullptr;
    float* out = row_lse.data_ptr<float>();
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kBlockRows, rows = std::min(kBlockRows, n - r0);
      at::Tensor q_blk = q.narrow(0, r0, rows);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t c0 = 0; c0 < N; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, N - c0);
        at::Tensor tile = tile_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(tile, q_blk, k.narrow(0, c0, cols).t());  // L = (s q) k^T for this tile
        tile_forward(tile.data_ptr<float>(), rows, cols, tile.stride(0), m.data(), l.data(),
                     with_col ? cm + c0 : nullptr, with_col ? cs + c0 : nullptr, with_col, tile_cmax.data());
      }
      for (int64_t i = 0; i < rows; ++i) out[r0 + i] = m[i] + std::log(l[i]);
    }
  });

  at::Tensor col_lse = at::empty({0}, q.options());
  if (with_col) {
    // merge: lse = M + log sum_t sum_t * exp(max_t - M); threads that saw no rows hold (-inf, 0)
    at::Tensor M = std::get<0>(col_max.max(0));
    at::Tensor safe_M = at::where(M.isneginf(), at::zeros_like(M), M);
    col_lse = safe_M + (col_sum * (col_max - safe_M.unsqueeze(0)).exp()).sum(0).log();
  }
  return {row_lse, col_lse};
}

// Returns (dq [n, D], dk [N, D]) in the features' dtype and dscale (float32 scalar).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            double scale, const at::Tensor& row_lse,
                                                            const at::Tensor& col_lse, const at::Tensor& g_row,
                                                            const at::Tensor& g_col) {
  check_features(q_in, k_in);
  at::NoGradGuard no_grad;
  const int64_t n = q_in.size(0), N = k_in.size(0), D = q_in.size(1);
  const bool use_row = g_row.numel() > 0, use_col = g_col.numel() > 0;
  if (use_row) {
    check_vector(row_lse, n, "row_lse", "[n]");
    check_vector(g_row, n, "grad_row", "[n]");
  }
  if (use_col) {
    check_vector(col_lse, N, "col_lse", "[N]");
    check_vector(g_col, N, "grad_col", "[N]");
  }
  at::Tensor q = as_float(q_in);
  at::Tensor k = as_float(k_in);
  at::Tensor rl = row_lse.detach().contiguous(), cl = col_lse.detach().contiguous();
  at::Tensor gr = g_row.detach().contiguous(), gc = g_col.detach().contiguous();
  const float s = static_cast<float>(scale);
  at::Tensor dq = at::zeros({n, D}, q.options());
  const int64_t row_blocks = (n + kBlockRows - 1) / kBlockRows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), row_blocks);  // as in lse_forward
  at::Tensor dk_parts = at::zeros({threads, N, D}, q.options());
  std::vector<double> ds_parts(threads, 0.0);

  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    TORCH_CHECK(t < threads, "contrastive_lse: thread ", t, " of a parallel_for over ", row_blocks, " row blocks");
    at::Tensor dl_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    at::Tensor dk_t = dk_parts[t];
    double ds_acc = 0.0;
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kBlockRows, rows = std::min(kBlockRows, n - r0);
      at::Tensor q_blk = q.narrow(0, r0, rows);
      at::Tensor dq_blk = dq.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < N; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, N - c0);
        at::Tensor k_blk = k.narrow(0, c0, cols);
        at::Tensor dl = dl_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(dl, q_blk, k_blk.t());  // raw q_i . k_j, turned into dL in place
        ds_acc += tile_backward(dl.data_ptr<float>(), rows, cols, dl.stride(0), s,
                                use_row ? rl.data_ptr<float>() + r0 : nullptr,
                                use_row ? gr.data_ptr<float>() + r0 : nullptr,
                                use_col ? cl.data_ptr<float>() + c0 : nullptr,
                                use_col ? gc.data_ptr<float>() + c0 : nullptr);
        dq_blk.addmm_(dl, k_blk);
        dk_t.narrow(0, c0, cols).addmm_(dl.t(), q_blk);
      }
    }
    ds_parts[t] += ds_acc;
  });

  double ds = 0.0;
  for (double v : ds_parts) ds += v;
  at::Tensor dk = dk_parts.sum(0).mul_(s);
  dq.mul_(s);
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), at::scalar_tensor(ds, q.options())};
}

void register_bpe(pybind11::module& m);           // csrc/bpe.cpp
void register_sigmoid_loss(pybind11::module& m);  // csrc/sigmoid_loss.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastclip C++ CPU kernels";
  register_bpe(m);
  register_sigmoid_loss(m);
  m.def("lse_forward", &lse_forward, "fused contrastive LSE forward (CPU)", py::arg("q"), py::arg("k"),
        py::arg("scale"), py::arg("with_col"));
  m.def("lse_backward", &lse_backward, "fused contrastive LSE backward (CPU)", py::arg("q"), py::arg("k"),
        py::arg("scale"), py::arg("row_lse"), py::arg("col_lse"), py::arg("grad_row"), py::arg("grad_col"));
}
