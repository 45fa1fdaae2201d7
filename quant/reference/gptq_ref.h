// The float64 oracle of the GPTQ solver: the algorithm of FORMATS.md written unblocked
// with plain loops, double precision everywhere, its own min-max quantizer and its own
// Cholesky factorizations (the reference's sequence: Cholesky of the damped H, its inverse,
// the upper Cholesky factor of that inverse). Slow (O(out·in² + in³)); for tests only.
//
// With GptqOptions::reference_compat or stale_group_params the oracle reproduces the stale
// group fit by fitting a group that starts at column k on the weights as they were at the
// start of k's block of options.block_size columns (the reference's global W); otherwise it
// fits on the current weights, and block_size plays no role.
// Thread-safety: pure function.
#ifndef QFORGE_QUANT_REFERENCE_GPTQ_REF_H_
#define QFORGE_QUANT_REFERENCE_GPTQ_REF_H_

#include <cstddef>  // before matrix.h, which uses ::size_t without including it
#include <cstdint>
#include <vector>

#include "quant/gptq.h"
#include "base/matrix.h"
#include "base/status.h"

namespace qforge::quant::reference {

struct GptqRefResult {
  int64_t num_groups = 0;
  std::vector<uint8_t> codes;  // [out, in], original column order
  std::vector<double> scales;  // [num_groups, out]
  std::vector<int32_t> zeros;  // [num_groups, out]
  std::vector<int32_t> g_idx;  // [in]
  std::vector<int32_t> perm;   // processing order
  MatrixD dequant;             // [out, in]
  double proxy_loss = 0;       // Σ (w−q)²/d²/2
  double output_error = 0;     // tr(ΔW H ΔWᵀ), original H
  double damp_percent_used = 0;
  int cholesky_attempts = 0;
};

// Same inputs and errors as GptqSolver::Quantize (w: [out, in], h: [in, in]).
StatusOr<GptqRefResult> GptqReference(const Matrix& w, const Matrix& h, const GptqOptions& o);

// The oracle's min-max quantizer for one group of values (double): returns {scale, zero}
// per the options (bits, sym, mse, sym quirk under reference_compat, v1 zero fix).
struct RefParams {
  double scale = 1;
  int zero = 0;
};
RefParams RefFindParams(const std::vector<double>& x, const GptqOptions& o);
int RefQuantize(double x, const RefParams& p, int bits);

}  // namespace qforge::quant::reference

#endif  // QFORGE_QUANT_REFERENCE_GPTQ_REF_H_
