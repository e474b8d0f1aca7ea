// Small-M dense projection for decode steps: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), M <= 32.
// Arguments are validated by the caller (csrc/bind/linear.cpp).
#pragma once

#include <cstdint>

#include "vita/tensor.h"

namespace vita {

constexpr int64_t kLinearMaxRows = 32;

// x: [M, K] (rows may be strided, last dim dense); w: [N, K] contiguous (torch's nn.Linear layout);
// bias: [N] (ndim == -1 when absent); out: [M, N] (rows may be strided, last dim dense). All one
// dtype (float32 or bfloat16); accumulation in float32, one rounding of (sum + bias) to the dtype.
struct LinearArgs {
  TensorRef x, w, bias, out;
};

namespace cpu {
void linear_small_m(const LinearArgs& a);
}  // namespace cpu

}  // namespace vita
