// CPU codec kernels: direct (im2col-free) 1-D convolution and transposed convolution.
//
// Scheme (both ops): the activated input of a batch group is staged once into a zero-padded
// float32 buffer (LeakyReLU, dtype conversion and the padding are applied there, so the inner loop
// is branch-free), then parallel_for runs over (batch, output-channel group, time chunk) tasks.
// A register-blocked micro kernel computes a 4-channel x 24-step tile: per (input channel, tap) it
// loads 3 vectors of 8 time steps and broadcasts 4 weights (12 FMAs), accumulating in float32.
// The epilogue (bias, residual, alpha/beta accumulation, tanh, dtype store) runs on the tile.
// Transposed convolution is done polyphase: each output phase r = (t + pad) mod stride is an
// ordinary stride-1 correlation over the input with taps k = r, r+stride, ... (reversed).
#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"
#include "vita/kernels/codec.h"
#include "vita/parallel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VITA_CONV_AVX2 1
#endif

namespace vita::cpu {
namespace {

constexpr int kOB = 4;          // output channels per micro tile
constexpr int kTV = 3;          // 8-wide vectors per micro tile
constexpr int kTT = 8 * kTV;    // time steps per micro tile
constexpr int64_t kStageBudget = int64_t(16) << 20;  // floats of staged input per batch group (64 MB)

// acc[o][t] = sum_{i<Cin, k<K} w[o*wso + i*wsi + k*wsk] * xs[i*ldx + k*kstep + t],  o < NO, t < kTT.
template <int NO>
inline void micro(const float* __restrict xs, int64_t ldx, int64_t Cin, int K, int64_t kstep, const float* __restrict w,
                  int64_t wso, int64_t wsi, int64_t wsk, float* __restrict acc) {
#ifdef VITA_CONV_AVX2
  __m256 a[NO][kTV];
#pragma GCC unroll 4
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < kTV; ++v) a[o][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < Cin; ++i) {
    const float* xi = xs + i * ldx;
    const float* wi = w + i * wsi;
    for (int k = 0; k < K; ++k) {
      const float* xk = xi + k * kstep;
      __m256 xv[kTV];
#pragma GCC unroll 4
      for (int v = 0; v < kTV; ++v) xv[v] = _mm256_loadu_ps(xk + 8 * v);
      const float* wk = wi + k * wsk;
#pragma GCC unroll 4
      for (int o = 0; o < NO; ++o) {
        const __m256 wv = _mm256_broadcast_ss(wk + o * wso);
#pragma GCC unroll 4
        for (int v = 0; v < kTV; ++v) a[o][v] = _mm256_fmadd_ps(wv, xv[v], a[o][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < kTV; ++v) _mm256_storeu_ps(acc + o * kTT + 8 * v, a[o][v]);
#else
  float a[NO][kTT] = {};
  for (int64_t i = 0; i < Cin; ++i) {
    const float* xi = xs + i * ldx;
    const float* wi = w + i * wsi;
    for (int k = 0; k < K; ++k) {
      const float* xk = xi + k * kstep;
      for (int o = 0; o < NO; ++o) {
        const float wv = wi[k * wsk + o * wso];
#pragma omp simd
        for (int t = 0; t < kTT; ++t) a[o][t] += wv * xk[t];
      }
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int t = 0; t < kTT; ++t) acc[o * kTT + t] = a[o][t];
#endif
}

inline void micro_n(int no, const float* xs, int64_t ldx, int64_t Cin, int K, int64_t kstep, const float* w, int64_t wso, int64_t wsi,
                    int64_t wsk, float* acc) {
  switch (no) {
    case 4: return micro<4>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 3: return micro<3>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 2: return micro<2>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    default: return micro<1>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
  }
}

// Float32 view of a weight tensor: the tensor itself for float32, else a converted copy.
template <class T>
const float* weight_f32(const TensorRef& w, std::vector<float>& store) {
  if constexpr (std::is_same_v<T, float>) {
    return w.ptr<float>();
  } else {
    const int64_t n = w.numel();
    store.resize(n);
    const T* src = w.ptr<T>();
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) { load_row(src + b, store.data() + b, e - b); });
    return store.data();
  }
}

template <class T>
void load_bias(const TensorRef& bias, int64_t Cout, std::vector<float>& out) {
  out.assign(Cout, 0.f);
  if (bias.ndim >= 0) load_row(bias.ptr<T>(), out.data(), Cout);
}

// Stage rows: dst[r][p] = act(x[b, i, p - off]) for 0 <= p - off < Tin, else 0; r = (b - b0) * Cin + i.
template <class T>
void stage_input(const TensorRef& x, int64_t b0, int64_t nb, int64_t off, int64_t Lp, bool lrelu, float slope, float* dst) {
  const int64_t Cin = x.size(1), Tin = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  const T* X = x.ptr<T>();
  parallel_for(nb * Cin, std::max<int64_t>(1, 8192 / (Lp + 1)), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = b0 + r / Cin, i = r % Cin;
      float* d = dst + r * Lp;
      const int64_t p0 = std::max<int64_t>(0, off), p1 = std::min<int64_t>(Lp, off + Tin);
      for (int64_t p = 0; p < std::min(p0, Lp); ++p) d[p] = 0.f;
      if (p1 > p0) {
        load_row(X + b * sb + i * sc + (p0 - off), d + p0, p1 - p0);
        if (lrelu) {
#pragma omp simd
          for (int64_t p = p0; p < p1; ++p) d[p] = d[p] >= 0.f ? d[p] : d[p] * slope;
        }
      }
      for (int64_t p = std::max(p1, p0); p < Lp; ++p) d[p] = 0.f;
    }
  });
}

inline int64_t batch_group(int64_t B, int64_t rows_per_item, int64_t Lp) {
  const int64_t per = std::max<int64_t>(1, rows_per_item * Lp);
  return std::clamp<int64_t>(kStageBudget / per, 1, B);
}

template <class T>
void conv1d_impl(const Conv1dArgs& a) {
  const int64_t B = a.x.size(0), Cin = a.x.size(1);
  const int64_t Cout = a.out.size(1), Tout = a.out.size(2);
  const int K = int(a.weight.size(2));
  const int64_t d = a.dilation;
  if (B == 0 || Cout == 0 || Tout == 0) return;
  std::vector<float> wstore, bias;
  const float* W = weight_f32<T>(a.weight, wstore);
  load_bias<T>(a.bias, Cout, bias);
  const int64_t ntile = ceil_div(Tout, kTT);
  const int64_t Lp = ntile * kTT + (K - 1) * d;
  const int64_t Bg = batch_group(B, Cin, Lp);
  std::vector<float> xs(size_t(Bg * Cin * Lp));

  const bool has_res = a.residual.ndim >= 0, has_acc = a.accum.ndim >= 0 && a.beta != 0.f;
  T* O = a.out.ptr<T>();
  const T* R = has_res ? a.residual.ptr<T>() : nullptr;
  const T* A = has_acc ? a.accum.ptr<T>() : nullptr;
  const int64_t osb = a.out.stride(0), osc = a.out.stride(1);
  const int64_t rsb = has_res ? a.residual.stride(0) : 0, rsc = has_res ? a.residual.stride(1) : 0;
  const int64_t asb = has_acc ? a.accum.stride(0) : 0, asc = has_acc ? a.accum.stride(1) : 0;
  const float alpha = a.alpha, beta = a.beta;

  // Task = (batch item, group of kOG output channels, chunk of kTC micro tiles in time).
  const int64_t kOG = 4 * kOB;
  const int64_t ngrp = ceil_div(Cout, kOG);
  const int64_t tiles_per_chunk = std::max<int64_t>(1, std::min<int64_t>(8, ntile));
  const int64_t nchunk = ceil_div(ntile, tiles_per_chunk);

  for (int64_t b0 = 0; b0 < B; b0 += Bg) {
    const int64_t nb = std::min(Bg, B - b0);
    stage_input<T>(a.x, b0, nb, a.pad_left, Lp, a.lrelu, a.slope, xs.data());
    parallel_for(nb * ngrp * nchunk, 1, [&](int64_t tb, int64_t te) {
      alignas(32) float acc[kOB * kTT];
      float row[kTT], tmp[kTT];
      for (int64_t task = tb; task < te; ++task) {
        const int64_t bl = task / (ngrp * nchunk), rem = task % (ngrp * nchunk);
        const int64_t g = rem / nchunk, c = rem % nchunk;
        const int64_t b = b0 + bl;
        const float* xb = xs.data() + bl * Cin * Lp;
        const int64_t tile_end = std::min(ntile, (c + 1) * tiles_per_chunk);
        for (int64_t tile = c * tiles_per_chunk; tile < tile_end; ++tile) {
          const int64_t t0 = tile * kTT;
          const int64_t nt = std::min<int64_t>(kTT, Tout - t0);
          const int64_t o_end = std::min(Cout, (g + 1) * kOG);
          for (int64_t o0 = g * kOG; o0 < o_end; o0 += kOB) {
            const int no = int(std::min<int64_t>(kOB, o_end - o0));
            micro_n(no, xb + t0, Lp, Cin, K, d, W + o0 * Cin * K, Cin * K, K, 1, acc);
            for (int oo = 0; oo < no; ++oo) {
              const int64_t o = o0 + oo;
              const float* ac = acc + oo * kTT;
              for (int64_t t = 0; t < nt; ++t) row[t] = ac[t] + bias[o];
              if (R) {
                load_row(R + b * rsb + o * rsc + t0, tmp, nt);
                for (int64_t t = 0; t < nt; ++t) row[t] += tmp[t];
              }
              if (alpha != 1.f)
                for (int64_t t = 0; t < nt; ++t) row[t] *= alpha;
              if (A) {
                load_row(A + b * asb + o * asc + t0, tmp, nt);
                for (int64_t t = 0; t < nt; ++t) row[t] += beta * tmp[t];
              }
              if (a.tanh_out)
                for (int64_t t = 0; t < nt; ++t) row[t] = std::tanh(row[t]);
              store_row(row, O + b * osb + o * osc + t0, nt);
            }
          }
        }
      }
    });
  }
}

template <class T>
void conv_transpose1d_impl(const ConvTranspose1dArgs& a) {
  const int64_t B = a.x.size(0), Cin = a.x.size(1);
  const int64_t Cout = a.out.size(1), Tout = a.out.size(2);
  const int K = int(a.weight.size(2));
  const int64_t s = a.stride, pl = a.pad_left;
  if (B == 0 || Cout == 0 || Tout == 0) return;
  std::vector<float> wstore, bias;
  const float* W = weight_f32<T>(a.weight, wstore);
  load_bias<T>(a.bias, Cout, bias);

  // Phase r: outputs t with (t + pl) % s == r, i.e. t = s*q + r - pl for q in [q_lo(r), q_hi(r)].
  // y = sum_{n < Kr} w[r + s*n] x[q - n] = sum_{m < Kr} w[r + s*(Kr-1-m)] xs[q + m + OFF - Kr + 1],
  // with xs[p] = act(x[p - OFF]) and OFF = ceil(K/s) - 1 (the largest Kr - 1).
  const int64_t KrMax = ceil_div(K, s);
  const int64_t OFF = KrMax - 1;
  struct Phase {
    int64_t q_lo, nq, ntile, Kr;
  };
  std::vector<Phase> ph(s);
  int64_t q_end_max = 0, tiles_total = 0;
  for (int64_t r = 0; r < s; ++r) {
    const int64_t q_lo = r >= pl ? 0 : ceil_div(pl - r, s);  // (pl - r) > 0 here
    const int64_t last = pl + Tout - 1 - r;                   // u - r of the last output
    const int64_t q_hi = last >= 0 ? last / s : -1;
    Phase p{q_lo, std::max<int64_t>(0, q_hi - q_lo + 1), 0, K > r ? ceil_div(K - r, s) : 0};
    p.ntile = ceil_div(p.nq, kTT);
    q_end_max = std::max(q_end_max, q_lo + p.ntile * kTT);
    tiles_total += p.ntile;
    ph[r] = p;
  }
  const int64_t Lp = q_end_max + OFF + 1;
  const int64_t Bg = batch_group(B, Cin, Lp);
  std::vector<float> xs(size_t(Bg * Cin * Lp));
  // Flat (phase, tile) list so tasks balance across phases.
  std::vector<std::pair<int32_t, int64_t>> tiles;
  tiles.reserve(tiles_total);
  for (int64_t r = 0; r < s; ++r)
    for (int64_t t = 0; t < ph[r].ntile; ++t) tiles.emplace_back(int32_t(r), t);

  T* O = a.out.ptr<T>();
  const int64_t osb = a.out.stride(0), osc = a.out.stride(1);
  const int64_t kOG = 4 * kOB;
  const int64_t ngrp = ceil_div(Cout, kOG);
  const int64_t per_chunk = std::max<int64_t>(1, std::min<int64_t>(8, tiles_total));
  const int64_t nchunk = ceil_div(tiles_total, per_chunk);

  for (int64_t b0 = 0; b0 < B; b0 += Bg) {
    const int64_t nb = std::min(Bg, B - b0);
    stage_input<T>(a.x, b0, nb, OFF, Lp, a.lrelu, a.slope, xs.data());
    parallel_for(nb * ngrp * nchunk, 1, [&](int64_t tb, int64_t te) {
      alignas(32) float acc[kOB * kTT];
      for (int64_t task = tb; task < te; ++task) {
        const int64_t bl = task / (ngrp * nchunk), rem = task % (ngrp * nchunk);
        const int64_t g = rem / nchunk, c = rem % nchunk;
        const int64_t b = b0 + bl;
        const float* xb = xs.data() + bl * Cin * Lp;
        T* ob = O + b * osb;
        const int64_t o_end = std::min(Cout, (g + 1) * kOG);
        const int64_t i_end = std::min<int64_t>(tiles_total, (c + 1) * per_chunk);
        for (int64_t ti = c * per_chunk; ti < i_end; ++ti) {
          const int64_t r = tiles[ti].first;
          const Phase& p = ph[r];
          const int64_t q0 = p.q_lo + tiles[ti].second * kTT;
          const int64_t nq = std::min<int64_t>(kTT, p.q_lo + p.nq - q0);
          for (int64_t o0 = g * kOG; o0 < o_end; o0 += kOB) {
            const int no = int(std::min<int64_t>(kOB, o_end - o0));
            if (p.Kr > 0) {
              // weight [Cin, Cout, K]: o stride K, i stride Cout*K, tap m -> k = r + s*(Kr-1-m).
              micro_n(no, xb + q0 + OFF - p.Kr + 1, Lp, Cin, int(p.Kr), 1, W + o0 * K + r + s * (p.Kr - 1), K, Cout * K, -s, acc);
            } else {
              std::fill(acc, acc + kOB * kTT, 0.f);
            }
            for (int oo = 0; oo < no; ++oo) {
              const int64_t o = o0 + oo;
              T* orow = ob + o * osc;
              for (int64_t j = 0; j < nq; ++j) orow[s * (q0 + j) + r - pl] = from_float<T>(acc[oo * kTT + j] + bias[o]);
            }
          }
        }
      }
    });
  }
}

}  // namespace

void conv1d(const Conv1dArgs& a) {
  dispatch_float(a.x.dtype, "conv1d", "x", [&](auto d) { conv1d_impl<typename CpuType<decltype(d)::value>::type>(a); });
}

void conv_transpose1d(const ConvTranspose1dArgs& a) {
  dispatch_float(a.x.dtype, "conv_transpose1d", "x",
                 [&](auto d) { conv_transpose1d_impl<typename CpuType<decltype(d)::value>::type>(a); });
}

}  // namespace vita::cpu
