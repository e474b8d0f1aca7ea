// Token sampling for the LLM and the TTS AR decoder: greedy, or top-k (k = 0: full vocabulary)
// with temperature, drawn by the Gumbel-max trick from a counter-based RNG (vita/philox.h) so a
// stream's draw depends only on (seed, step, token id) — reproducible on CPU and CUDA and
// independent of how streams are batched.
#pragma once

#include "vita/tensor.h"

namespace vita {

// logits [B, V] float; out int64 [B]; temperature float32 [B] (<= 0: greedy);
// top_k int32 [B] (<= 0 or >= V: whole vocabulary); seed int64 [B]; step int64 [B].
struct SampleArgs {
  TensorRef logits, out, temperature, top_k, seed, step;
};

constexpr int kMaxTopKCuda = 64;

namespace cpu {
void sample_tokens(const SampleArgs& a);
}
namespace cuda {
void sample_tokens(const SampleArgs& a, int64_t stream);
}

}  // namespace vita
