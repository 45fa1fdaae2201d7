// Device-memory estimate of the CUDA GPTQ backend (pure arithmetic; built everywhere).
//
// It mirrors the allocations of gptq_cuda.cu (AllocateLayer) term by term; keep the two in
// step. With m = out_features, n = in_features, bs = min(block_size, n), G = min(group
// size, n) and ng groups, in bytes:
//   persistent: W 4mn, H 4n², factor 4n², codes mn, scales + zeros 8·ng·m, index vectors
//               (perm, group of each position, g_idx: int32; dead: uint8) 13n, row losses 8m,
//               status words 12;
//   one scratch buffer, the larger of
//     (a) sweep: working W 4mn, error block 4m·bs, MSE value rows 4m·G (mse only), stale
//         rows 4m·bs (stale group fits only; allocated when the row segments do not fit in
//         shared memory), cuSOLVER device workspaces of Spotrf and Xtrtri, queried at run
//         time and bounded here by 4n² + 32 MiB (one n x n float copy plus blocking space);
//     (b) metrics: Gram matrix 8n², row chunk 8·min(mn, max(n, 2^23)), 1025 reduction doubles;
//   256-byte alignment of every buffer and carve (64 KiB covers it), plus 64 MiB for what
//   the libraries and the stream-ordered allocator add (cuBLAS/cuSOLVER internal workspaces,
//   allocation granularity).
#include <algorithm>

#include "quant/cuda/memory_estimates.h"

namespace qforge::quant {

uint64_t CudaGptqMemoryBytes(int64_t out_features, int64_t in_features, const GptqOptions& o) {
  const uint64_t m = static_cast<uint64_t>(std::max<int64_t>(out_features, 0));
  const uint64_t n = static_cast<uint64_t>(std::max<int64_t>(in_features, 1));
  const uint64_t bs = std::min<uint64_t>(static_cast<uint64_t>(std::max(o.block_size, 1)), n);
  const uint64_t gs = o.group_size >= 1 ? static_cast<uint64_t>(o.group_size) : n;
  const uint64_t vals_cols = std::min(gs, n);
  const uint64_t groups = (n + gs - 1) / gs;
  const bool stale = o.reference_compat || o.stale_group_params;

  const uint64_t persistent =
      4 * m * n + 4 * n * n + 4 * n * n + m * n + 8 * groups * m + 13 * n + 8 * m + 12;
  const uint64_t solver_workspace = 4 * n * n + (32ull << 20);
  const uint64_t sweep = 4 * m * n + 4 * m * bs + (o.mse ? 4 * m * vals_cols : 0) +
                         (stale ? 4 * m * bs : 0) + solver_workspace;
  const uint64_t metrics_chunk = std::min(m * n, std::max<uint64_t>(n, 1ull << 23));
  const uint64_t metrics = 8 * n * n + 8 * metrics_chunk + 8 * 1025;
  return persistent + std::max(sweep, metrics) + (64ull << 10) + (64ull << 20);
}

}  // namespace qforge::quant
