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

// Online LSE update of a running (max, sum) by a block whose maxima are `block_max` and values `tile`.
// `reduce_dim` 1 updates rows, 0 updates columns; `work` is scratch of the tile's shape.
void online_lse_update(const at::Tensor& tile, int64_t reduce_dim, at::Tensor& run_max, at::Tensor& run_sum,
                       at::Tensor& work) {
  at::Tensor block_max = std::get<0>(tile.max(reduce_dim));  // max propagates NaN, unlike a plain compare
  at::Tensor new_max = at::maximum(run_max, block_max);
  at::Tensor shifted = reduce_dim == 1 ? new_max.unsqueeze(1) : new_max.unsqueeze(0);
  at::sub_out(work, tile, shifted);
  work.exp_();
  // sum * exp(old_max - new_max): 0 on the first block (old_max = -inf)
  run_sum.mul_((run_max - new_max).exp_()).add_(work.sum(reduce_dim));
  run_max.copy_(new_max);
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
  const int threads = at::get_num_threads();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // per-thread running column statistics, merged after the parallel region
  at::Tensor col_max = at::full({threads, with_col ? N : 0}, neg_inf, q.options());
  at::Tensor col_sum = at::zeros({threads, with_col ? N : 0}, q.options());

  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    at::Tensor tile_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    at::Tensor work_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kBlockRows, rows = std::min(kBlockRows, n - r0);
      at::Tensor q_blk = q.narrow(0, r0, rows);
      at::Tensor m = at::full({rows}, neg_inf, q.options());
      at::Tensor l = at::zeros({rows}, q.options());
      for (int64_t c0 = 0; c0 < N; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, N - c0);
        at::Tensor tile = tile_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::Tensor work = work_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(tile, q_blk, k.narrow(0, c0, cols).t());  // L = (s q) k^T for this tile
        online_lse_update(tile, 1, m, l, work);
        if (with_col) {
          at::Tensor cm = col_max[t].narrow(0, c0, cols), cs = col_sum[t].narrow(0, c0, cols);
          online_lse_update(tile, 0, cm, cs, work);
        }
      }
      row_lse.narrow(0, r0, rows).copy_(m + l.log());
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
  const int threads = at::get_num_threads();
  at::Tensor dk_parts = at::zeros({threads, N, D}, q.options());
  std::vector<double> ds_parts(threads, 0.0);
  const int64_t row_blocks = (n + kBlockRows - 1) / kBlockRows;

  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    at::Tensor raw_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    at::Tensor dl_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    at::Tensor work_buf = at::empty({kBlockRows, kBlockCols}, q.options());
    at::Tensor dk_t = dk_parts[t];
    double ds_acc = 0.0;
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kBlockRows, rows = std::min(kBlockRows, n - r0);
      at::Tensor q_blk = q.narrow(0, r0, rows);
      at::Tensor dq_blk = dq.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < N; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, N - c0);
        at::Tensor k_blk = k.narrow(0, c0, cols);
        at::Tensor raw = raw_buf.narrow(0, 0, rows).narrow(1, 0, cols);  // q_i . k_j
        at::Tensor dl = dl_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::Tensor work = work_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(raw, q_blk, k_blk.t());
        dl.zero_();
        if (use_row) {  // g_row[i] * P_row[i, j] = g_row[i] * exp(s raw - row_lse[i])
          at::mul_out(work, raw, s).sub_(rl.narrow(0, r0, rows).unsqueeze(1)).exp_();
          dl.addcmul_(work, gr.narrow(0, r0, rows).unsqueeze(1));
        }
        if (use_col) {  // g_col[j] * P_col[i, j]
          at::mul_out(work, raw, s).sub_(cl.narrow(0, c0, cols).unsqueeze(0)).exp_();
          dl.addcmul_(work, gc.narrow(0, c0, cols).unsqueeze(0));
        }
        ds_acc += at::mul_out(work, dl, raw).sum().item<double>();  // CPU: a plain read, not a device sync
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastclip C++ CPU kernels";
  m.def("lse_forward", &lse_forward, "fused contrastive LSE forward (CPU)", py::arg("q"), py::arg("k"),
        py::arg("scale"), py::arg("with_col"));
  m.def("lse_backward", &lse_backward, "fused contrastive LSE backward (CPU)", py::arg("q"), py::arg("k"),
        py::arg("scale"), py::arg("row_lse"), py::arg("col_lse"), py::arg("grad_row"), py::arg("grad_col"));
}
