// Codec (HiFi-GAN style generator) kernels: direct 1-D convolution with fused input LeakyReLU,
// bias, residual add, scaled accumulation and tanh; and transposed 1-D convolution (upsampling)
// with fused input LeakyReLU and bias. Arguments are validated by the caller (csrc/bind/codec.cpp).
//
// Layout: activations [B, C, T] with a dense last (time) dimension; the batch and channel strides
// are free, so slices of a larger time buffer (streaming state) can be read and written in place.
// Weights are contiguous in the torch layout. Every kernel accumulates in float32.
#pragma once

#include <cstdint>

#include "vita/tensor.h"

namespace vita {

// out[b,o,t] = post( alpha * (bias[o] + residual[b,o,t]
//                              + sum_{i,k} w[o,i,k] * act(x[b,i, t + k*dilation - pad_left]))
//                    + beta * accum[b,o,t] )
//   act(v) = v >= 0 ? v : slope * v   when lrelu, else identity   (applied to x only)
//   x outside [0, Tin) reads as zero (zero padding: any left pad, right pad = whatever Tout implies)
//   post = tanh when tanh_out, else identity.
// x: [B, Cin, Tin]; weight: [Cout, Cin, K] contiguous; bias: [Cout] or absent (ndim == -1);
// residual / accum: [B, Cout, Tout] or absent; both may alias out (read before write, same element).
// out: [B, Cout, Tout]; Tout is taken from out. out must not overlap x.
struct Conv1dArgs {
  TensorRef x, weight, bias, residual, accum, out;
  int64_t pad_left = 0;
  int dilation = 1;
  bool lrelu = false;
  float slope = 0.1f;
  float alpha = 1.f, beta = 0.f;
  bool tanh_out = false;
};

// out[b,o,t] = bias[o] + sum_{i,j,k : stride*j + k == t + pad_left} w[i,o,k] * act(x[b,i,j])
// x: [B, Cin, Tin]; weight: [Cin, Cout, K] contiguous (torch ConvTranspose1d layout); bias: [Cout] or
// absent; out: [B, Cout, Tout], Tout taken from out (torch: (Tin-1)*stride - pad_left - pad_right + K).
struct ConvTranspose1dArgs {
  TensorRef x, weight, bias, out;
  int stride = 1;
  int64_t pad_left = 0;
  bool lrelu = false;
  float slope = 0.1f;
};

namespace cpu {
void conv1d(const Conv1dArgs& a);
void conv_transpose1d(const ConvTranspose1dArgs& a);
}  // namespace cpu

namespace cuda {
// Asynchronous on `stream`; no host synchronisation and no allocation.
void conv1d(const Conv1dArgs& a, int64_t stream);
void conv_transpose1d(const ConvTranspose1dArgs& a, int64_t stream);
}  // namespace cuda

}  // namespace vita
