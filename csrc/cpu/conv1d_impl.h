// The codec's direct (im2col-free) 1-D convolution and polyphase transposed convolution, built once
// per vector width: conv1d.cpp (VITA_VW 8: AVX2 / generic) and conv1d_avx512.cpp (16: AVX-512),
// chosen at run time by conv1d.cpp (cpu_isa.h).
//
// Scheme (both ops): the activated input is staged into a zero-padded float32 buffer (LeakyReLU,
// dtype conversion and the padding are applied there, so the inner loop is branch-free) and
// parallel_for runs over (batch, time chunk, output-channel group) tasks; conv1d stages per task
// (the chunk's rows, reused by the channel groups that follow), conv_transpose1d per batch group.
// A register-blocked micro kernel computes a kOB-channel x kTT-step tile: per (input channel, tap)
// it loads kTV vectors of VW time steps and broadcasts kOB weights (kOB * kTV FMAs), accumulating
// in float32 (AVX2: 4 x 3 vectors of 8 = 12 of the 16 registers; AVX-512: 8 x 3 vectors of 16 =
// 24 of the 32). The epilogue (bias, residual, alpha/beta accumulation, tanh, dtype store) runs on
// whole vectors of the tile.
// Transposed convolution is done polyphase: output u = t + pad_left = stride * q + r has phase r,
// an ordinary stride-1 correlation over the input with taps k = r, r + stride, ... (reversed). One
// tile covers kTT values of q for every phase, i.e. stride * kTT consecutive outputs, so the phases
// are interleaved in an L1 buffer and each output row is written with contiguous vector stores.
//
// Included inside a private namespace after vecw_impl.h, "vita/kernels/codec.h" and
// "vita/parallel.h". No include guard on purpose.

constexpr int kOB = VW == 16 ? 8 : 4;  // output channels per micro tile
constexpr int kTV = 3;                 // vectors per micro tile
constexpr int kTT = VW * kTV;          // time steps per micro tile
constexpr int64_t kOG = 16;            // output channels per task
// Phase-major transposed tiles share each input vector across all their rows, so wider tiles (more
// vectors per row) cut the loads and weight broadcasts per FMA: AVX-512 takes 4 vectors where
// rows * 4 accumulators + 4 inputs + 1 broadcast fit the 32 registers (rows <= 6), else kTV.
constexpr int kTVpMax = VW == 16 ? 4 : kTV;
constexpr int kTTp = VW * kTVpMax;  // acc row stride of the phase-major tiles
// AVX2 (16 registers) fits one channel's 5 or 6 phases only 2 vectors wide (strides 5 and 6).
constexpr int tv_phase(int rows) { return VW == 16 ? (rows <= 6 ? 4 : kTV) : (rows <= 4 ? kTV : 2); }
constexpr int kPhRowsMax = VW == 16 ? kOB : 6;  // rows of a phase-major tile
constexpr int64_t kStageBudget = int64_t(16) << 20;  // floats of staged input per batch group (64 MB)

// acc[o][t] = sum_{i<Cin, k<K} w[o*wso + i*wsi + k*wsk] * xs[i*ldx + k*kstep + t],  o < NO, t < kTT.
template <int NO>
inline void micro(const float* __restrict xs, int64_t ldx, int64_t Cin, int K, int64_t kstep, const float* __restrict w,
                  int64_t wso, int64_t wsi, int64_t wsk, float* __restrict acc) {
  vf a[NO][kTV];
#pragma GCC unroll 8
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < kTV; ++v) a[o][v] = vf{};
  for (int64_t i = 0; i < Cin; ++i) {
    const float* xi = xs + i * ldx;
    const float* wi = w + i * wsi;
    for (int k = 0; k < K; ++k) {
      const float* xk = xi + k * kstep;
      vf xv[kTV];
#pragma GCC unroll 4
      for (int v = 0; v < kTV; ++v) xv[v] = ldv(xk + VW * v);
      const float* wk = wi + k * wsk;
#pragma GCC unroll 8
      for (int o = 0; o < NO; ++o) {
        const vf wv = splat(wk[o * wso]);
#pragma GCC unroll 4
        for (int v = 0; v < kTV; ++v) a[o][v] += wv * xv[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < kTV; ++v) stv(acc + o * kTT + VW * v, a[o][v]);
}

inline void micro_n(int no, const float* xs, int64_t ldx, int64_t Cin, int K, int64_t kstep, const float* w, int64_t wso, int64_t wsi,
                    int64_t wsk, float* acc) {
  switch (no) {
#if VITA_VW == 16
    case 8: return micro<8>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 7: return micro<7>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 6: return micro<6>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 5: return micro<5>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
#endif
    case 4: return micro<4>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 3: return micro<3>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    case 2: return micro<2>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
    default: return micro<1>(xs, ldx, Cin, K, kstep, w, wso, wsi, wsk, acc);
  }
}

// Phase-major micro tile of a transposed convolution: rows are (channel c < NC, phase r0 + r,
// r < NR), all rows share each input vector, and a channel's weights for one tap block are
// contiguous in the torch layout (w[i][o][s*n + r]). Every phase runs Kr = ceil(K / s) taps, m = 0
// being tap block n = Kr - 1, which only phases below rv = K - s*(Kr - 1) have.
// acc[(c*NR + r)*kTTp + t] = sum_i sum_m w[c*wsc + i*wsi + r - s*m] * xs[i*ldx + m + t], t < VW*TV
// (w points at tap block Kr - 1 of phase r0).
template <int NC, int NR, int TV>
inline void micro_ph(const float* __restrict xs, int64_t ldx, int64_t Cin, int Kr, int rv, int64_t s, const float* __restrict w,
                     int64_t wsc, int64_t wsi, float* __restrict acc) {
  vf a[NC * NR][TV];
#pragma GCC unroll 8
  for (int o = 0; o < NC * NR; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < TV; ++v) a[o][v] = vf{};
  for (int64_t i = 0; i < Cin; ++i) {
    const float* xi = xs + i * ldx;
    const float* wi = w + i * wsi;
    // Consecutive input channels' weights are Cout*K floats apart (16 KB at the codec's first
    // upsampler), a stride the hardware prefetchers miss; fetch a few channels ahead.
    __builtin_prefetch(wi + 8 * wsi);
    {
      vf xv[TV];
#pragma GCC unroll 4
      for (int v = 0; v < TV; ++v) xv[v] = ldv(xi + VW * v);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          if (r >= rv) continue;  // k = r0 + r + s*(Kr-1) >= K: no such tap
          const vf wv = splat(wi[c * wsc + r]);
#pragma GCC unroll 4
          for (int v = 0; v < TV; ++v) a[c * NR + r][v] += wv * xv[v];
        }
    }
    for (int m = 1; m < Kr; ++m) {
      const float* xk = xi + m;
      vf xv[TV];
#pragma GCC unroll 4
      for (int v = 0; v < TV; ++v) xv[v] = ldv(xk + VW * v);
      const float* wk = wi - s * m;
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          const vf wv = splat(wk[c * wsc + r]);
#pragma GCC unroll 4
          for (int v = 0; v < TV; ++v) a[c * NR + r][v] += wv * xv[v];
        }
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < NC * NR; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < TV; ++v) stv(acc + o * kTTp + VW * v, a[o][v]);
}

// Phases per phase-major micro tile for stride s: s itself when it fits (then kOB / s channels
// share the tile), else blocks of kOB phases; 0 (per-phase tiles instead) when s > kOB is not a
// multiple of kOB, where the last block would leave most registers idle (AVX2 at stride 5).
inline int ph_block(int64_t s) { return s <= kPhRowsMax ? int(s) : (s % kOB == 0 ? kOB : 0); }
inline int ph_channels(int64_t s) { return s <= kOB ? int(kOB / s) : 1; }

// micro_ph for run-time nc (channels), nr (phases) and tv (vectors, <= tv_phase(nc * nr)) with
// nc * nr <= kOB.
template <int TV>
inline void micro_ph_tv(int nc, int nr, const float* xs, int64_t ldx, int64_t Cin, int Kr, int rv, int64_t s, const float* w,
                        int64_t wsc, int64_t wsi, float* acc) {
#define VITA_PH(NC_, NR_)                                                                  \
  if constexpr (TV <= tv_phase(NC_ * NR_))                                                 \
    if (nr == NR_ && nc == NC_) return micro_ph<NC_, NR_, TV>(xs, ldx, Cin, Kr, rv, s, w, wsc, wsi, acc)
#if VITA_VW == 16
  VITA_PH(1, 8); VITA_PH(1, 7); VITA_PH(1, 6); VITA_PH(1, 5);
  VITA_PH(2, 4); VITA_PH(2, 3); VITA_PH(4, 2); VITA_PH(8, 1);
  VITA_PH(3, 2); VITA_PH(5, 1); VITA_PH(6, 1); VITA_PH(7, 1);
#else
  VITA_PH(1, 6); VITA_PH(1, 5);
#endif
  VITA_PH(1, 4); VITA_PH(1, 3); VITA_PH(2, 2); VITA_PH(1, 2); VITA_PH(4, 1); VITA_PH(3, 1); VITA_PH(2, 1); VITA_PH(1, 1);
#undef VITA_PH
  for (int c = 0; c < nc; ++c) micro_ph_tv<TV>(1, nr, xs, ldx, Cin, Kr, rv, s, w + c * wsc, wsc, wsi, acc + c * nr * kTTp);
}

inline void micro_ph_n(int nc, int nr, int tv, const float* xs, int64_t ldx, int64_t Cin, int Kr, int rv, int64_t s, const float* w,
                       int64_t wsc, int64_t wsi, float* acc) {
  switch (tv) {
    case 1: return micro_ph_tv<1>(nc, nr, xs, ldx, Cin, Kr, rv, s, w, wsc, wsi, acc);
    case 2: return micro_ph_tv<2>(nc, nr, xs, ldx, Cin, Kr, rv, s, w, wsc, wsi, acc);
    case 3: return micro_ph_tv<3>(nc, nr, xs, ldx, Cin, Kr, rv, s, w, wsc, wsi, acc);
#if VITA_VW == 16
    default: return micro_ph_tv<4>(nc, nr, xs, ldx, Cin, Kr, rv, s, w, wsc, wsi, acc);
#else
    default: return micro_ph_tv<3>(nc, nr, xs, ldx, Cin, Kr, rv, s, w, wsc, wsi, acc);
#endif
  }
}

// dst[0, n) = float(src[0, n)), whole vectors plus one partial one.
template <class T>
inline void load_rowv(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) stv(dst + i, loadv(src + i));
  if (i < n) {
    float b[VW];
    stv(b, loadv_n(src + i, n - i));
    for (int64_t j = 0; j < n - i; ++j) dst[i + j] = b[j];
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
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) { load_rowv(src + b, store.data() + b, e - b); });
    return store.data();
  }
}

template <class T>
void load_bias(const TensorRef& bias, int64_t Cout, std::vector<float>& out) {
  out.assign(Cout, 0.f);
  if (bias.ndim >= 0) load_rowv(bias.ptr<T>(), out.data(), Cout);
}

// dst[p] = act(x[b, i, p - off]) for 0 <= p - off < Tin, else 0, for p < Lp (off may be negative).
template <class T>
inline void stage_row(const T* xrow, int64_t Tin, int64_t off, int64_t Lp, bool lrelu, float slope, float* d) {
  const int64_t p0 = std::min(Lp, std::max<int64_t>(0, off)), p1 = std::max(p0, std::min<int64_t>(Lp, off + Tin));
  std::fill(d, d + p0, 0.f);
  const T* s = xrow + (p0 - off);
  const int64_t n = p1 - p0;
  int64_t p = 0;
  for (; p + VW <= n; p += VW) {
    vf v = loadv(s + p);
    if (lrelu) v = v >= 0.f ? v : v * slope;
    stv(d + p0 + p, v);
  }
  if (p < n) {
    vf v = loadv_n(s + p, n - p);
    if (lrelu) v = v >= 0.f ? v : v * slope;
    float b8[VW];
    stv(b8, v);
    std::copy(b8, b8 + (n - p), d + p0 + p);
  }
  std::fill(d + p1, d + Lp, 0.f);
}

// Stage rows: dst[r][p] = act(x[b, i, p - off]), r = (b - b0) * Cin + i, rows of Lp floats.
template <class T>
void stage_input(const TensorRef& x, int64_t b0, int64_t nb, int64_t off, int64_t Lp, bool lrelu, float slope, float* dst) {
  const int64_t Cin = x.size(1), Tin = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  const T* X = x.ptr<T>();
  parallel_for(nb * Cin, std::max<int64_t>(1, 8192 / (Lp + 1)), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = b0 + r / Cin, i = r % Cin;
      stage_row(X + b * sb + i * sc, Tin, off, Lp, lrelu, slope, dst + r * Lp);
    }
  });
}

inline int64_t batch_group(int64_t B, int64_t rows_per_item, int64_t Lp) {
  const int64_t per = std::max<int64_t>(1, rows_per_item * Lp);
  return std::clamp<int64_t>(kStageBudget / per, 1, B);
}

template <class T>
void conv1d_impl(const Conv1dArgs& a) {
  const int64_t B = a.x.size(0), Cin = a.x.size(1), Tin = a.x.size(2);
  const int64_t Cout = a.out.size(1), Tout = a.out.size(2);
  const int K = int(a.weight.size(2));
  const int64_t d = a.dilation;
  if (B == 0 || Cout == 0 || Tout == 0) return;
  std::vector<float> wstore, bias;
  const float* W = weight_f32<T>(a.weight, wstore);
  load_bias<T>(a.bias, Cout, bias);
  const int64_t ntile = ceil_div(Tout, kTT);

  const bool has_res = a.residual.ndim >= 0, has_acc = a.accum.ndim >= 0 && a.beta != 0.f;
  const T* X = a.x.ptr<T>();
  T* O = a.out.ptr<T>();
  const T* R = has_res ? a.residual.ptr<T>() : nullptr;
  const T* A = has_acc ? a.accum.ptr<T>() : nullptr;
  const int64_t xsb = a.x.stride(0), xsc = a.x.stride(1);
  const int64_t osb = a.out.stride(0), osc = a.out.stride(1);
  const int64_t rsb = has_res ? a.residual.stride(0) : 0, rsc = has_res ? a.residual.stride(1) : 0;
  const int64_t asb = has_acc ? a.accum.stride(0) : 0, asc = has_acc ? a.accum.stride(1) : 0;
  const float alpha = a.alpha, beta = a.beta;
  const bool tanh_out = a.tanh_out;

  // Task = (batch item, chunk of micro tiles in time, group of kOG output channels), channel
  // groups innermost: a thread stages the activated input of its chunk (all Cin rows, L2-sized)
  // once and reuses it for the groups that follow, so there is one parallel region per call and
  // the staged rows are still in cache when the micro kernel reads them.
  const int64_t ngrp = ceil_div(Cout, kOG);
  const int64_t tiles_per_chunk = std::max<int64_t>(1, std::min<int64_t>(8, ntile));
  const int64_t nchunk = ceil_div(ntile, tiles_per_chunk);
  const int64_t chunk_len = tiles_per_chunk * kTT;
  const int64_t ldx = chunk_len + (K - 1) * d;  // staged row: the chunk's outputs need this much input

  parallel_for(B * nchunk * ngrp, 1, [&](int64_t tb, int64_t te) {
    alignas(64) float acc[kOB * kTT];
    std::vector<float> xs(size_t(Cin * ldx));
    int64_t staged = -1;
    for (int64_t task = tb; task < te; ++task) {
      const int64_t bc = task / ngrp, g = task % ngrp;
      const int64_t b = bc / nchunk, c = bc % nchunk;
      if (staged != bc) {
        for (int64_t i = 0; i < Cin; ++i)
          stage_row(X + b * xsb + i * xsc, Tin, a.pad_left - c * chunk_len, ldx, a.lrelu, a.slope, xs.data() + i * ldx);
        staged = bc;
      }
      const int64_t tile_end = std::min(ntile, (c + 1) * tiles_per_chunk);
      const int64_t o_end = std::min(Cout, (g + 1) * kOG);
      // Channel blocks outer, time tiles inner: a block's weights (kOB rows of Cin*K) stay in L1
      // across the chunk's tiles, while the staged input streams from L2 either way.
      for (int64_t o0 = g * kOG; o0 < o_end; o0 += kOB) {
        const int no = int(std::min<int64_t>(kOB, o_end - o0));
        for (int64_t tile = c * tiles_per_chunk; tile < tile_end; ++tile) {
          const int64_t t0 = tile * kTT;
          const int64_t nt = std::min<int64_t>(kTT, Tout - t0);
          micro_n(no, xs.data() + (t0 - c * chunk_len), ldx, Cin, K, d, W + o0 * Cin * K, Cin * K, K, 1, acc);
          for (int oo = 0; oo < no; ++oo) {
            const int64_t o = o0 + oo;
            const float* ac = acc + oo * kTT;
            const float bo = bias[o];
            T* orow = O + b * osb + o * osc + t0;
            const T* rrow = R ? R + b * rsb + o * rsc + t0 : nullptr;
            const T* arow = A ? A + b * asb + o * asc + t0 : nullptr;
            for (int64_t j = 0; j < nt; j += VW) {
              const int64_t n = std::min<int64_t>(VW, nt - j);
              const bool full = n == VW;
              vf y = ldv(ac + j) + bo;
              if (rrow) y += full ? loadv(rrow + j) : loadv_n(rrow + j, n);
              if (alpha != 1.f) y *= alpha;
              if (arow) y += beta * (full ? loadv(arow + j) : loadv_n(arow + j, n));
              if (tanh_out) y = tanhv(y);
              if (full)
                storev(orow + j, y);
              else
                storev_n(orow + j, y, n);
            }
          }
        }
      }
    }
  });
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

  // Phase r, output u = s*q + r: y = sum_{n < KrMax} w[r + s*n] x[q - n] (taps k >= K absent)
  //   = sum_{m < KrMax} w[r + s*(KrMax-1-m)] xs[q + m],
  // with xs[p] = act(x[p - OFF]), OFF = KrMax - 1 and KrMax = ceil(K / s).
  // Tiles cover q in [q0, q0 + tt) for every phase: outputs t = u - pl in [s*q0 - pl, s*(q0 + tt) - pl).
  // Phase-major tiles are tv vectors wide (the last one only as wide as the q left); per-phase
  // tiles kTT.
  const int64_t KrMax = ceil_div(K, s);
  const int64_t OFF = KrMax - 1;
  const int64_t qs = pl / s, qe = ceil_div(pl + Tout, s);
  const int phb = ph_block(s), phc = ph_channels(s);
  const int tv = phb ? tv_phase(phb * phc) : kTV;
  const int64_t tt = VW * tv;
  const int64_t ntile = ceil_div(qe - qs, tt);
  const int64_t Lp = qs + ntile * tt + OFF;
  const int64_t Bg = batch_group(B, Cin, Lp);
  std::vector<float> xs(size_t(Bg * Cin * Lp));

  T* O = a.out.ptr<T>();
  const int64_t osb = a.out.stride(0), osc = a.out.stride(1);
  const int64_t ngrp = ceil_div(Cout, kOG);
  const int64_t per_chunk = std::max<int64_t>(1, std::min<int64_t>(8, ntile));
  const int64_t nchunk = ceil_div(ntile, per_chunk);
  const int64_t span = s * std::max<int64_t>(tt, kTT);  // outputs per tile and channel
  const int64_t rv = K - s * (KrMax - 1);  // phases that have tap block KrMax - 1

  for (int64_t b0 = 0; b0 < B; b0 += Bg) {
    const int64_t nb = std::min(Bg, B - b0);
    stage_input<T>(a.x, b0, nb, OFF, Lp, a.lrelu, a.slope, xs.data());
    parallel_for(nb * ngrp * nchunk, 1, [&](int64_t tb, int64_t te) {
      alignas(64) float acc[kPhRowsMax * (kTTp > kTT ? kTTp : kTT)];
      std::vector<float> ybuf(size_t(kOB * span));  // one tile of kOB output rows, phases interleaved
      for (int64_t task = tb; task < te; ++task) {
        const int64_t bl = task / (ngrp * nchunk), rem = task % (ngrp * nchunk);
        const int64_t g = rem / nchunk, c = rem % nchunk;
        const int64_t b = b0 + bl;
        const float* xb = xs.data() + bl * Cin * Lp;
        const int64_t o_end = std::min(Cout, (g + 1) * kOG);
        const int64_t tile_end = std::min(ntile, (c + 1) * per_chunk);
        for (int64_t tile = c * per_chunk; tile < tile_end; ++tile) {
          const int64_t q0 = qs + tile * tt;
          const int64_t t_lo = std::max<int64_t>(0, s * q0 - pl), t_hi = std::min<int64_t>(Tout, s * (q0 + tt) - pl);
          const int tvt = int(std::min<int64_t>(tv, ceil_div(qe - q0, VW)));  // vectors this tile needs
          const int64_t ttt = VW * tvt;
          for (int64_t o0 = g * kOG; o0 < o_end; o0 += phb ? phc : kOB) {
            const int no = int(std::min<int64_t>(phb ? phc : kOB, o_end - o0));
            for (int64_t r = 0; r < (phb ? 0 : s); ++r) {
              // Per-phase tile: acc[oo*kTT + j] is output s*(q0 + j) + r - pl; phase r has Kr taps,
              // read from xs[q + m + OFF - Kr + 1] (weight [Cin, Cout, K]: tap m -> k = r + s*(Kr-1-m)).
              const int64_t Kr = K > r ? ceil_div(K - r, s) : 0;
              if (Kr > 0)
                micro_n(no, xb + q0 + OFF - Kr + 1, Lp, Cin, int(Kr), 1, W + o0 * K + r + s * (Kr - 1), K, Cout * K, -s, acc);
              else
                std::fill(acc, acc + kOB * kTT, 0.f);
              for (int oo = 0; oo < no; ++oo) {
                float* yb = ybuf.data() + oo * span + r;
                const float* ac = acc + oo * kTT;
                for (int j = 0; j < kTT; ++j) yb[s * j] = ac[j];
              }
            }
            for (int64_t r0 = 0; r0 < (phb ? s : 0); r0 += phb) {
              const int nr = int(std::min<int64_t>(phb, s - r0));
              // acc[(oo*nr + r)*kTTp + j] is output s*(q0 + j) + r0 + r - pl of channel o0 + oo.
              micro_ph_n(no, nr, tvt, xb + q0, Lp, Cin, int(KrMax), int(rv - r0), s, W + o0 * K + s * (KrMax - 1) + r0, K, Cout * K,
                         acc);
              for (int oo = 0; oo < no; ++oo)
                for (int r = 0; r < nr; ++r) {
                  float* yb = ybuf.data() + oo * span + r0 + r;
                  const float* ac = acc + (oo * nr + r) * kTTp;
                  for (int j = 0; j < ttt; ++j) yb[s * j] = ac[j];
                }
            }
            for (int oo = 0; oo < no; ++oo) {
              const int64_t o = o0 + oo;
              const float bo = bias[o];
              const float* yb = ybuf.data() + oo * span + (t_lo + pl - s * q0);  // yb[j] is output t_lo + j
              T* orow = O + b * osb + o * osc + t_lo;
              const int64_t n = t_hi - t_lo;
              int64_t j = 0;
              for (; j + VW <= n; j += VW) storev(orow + j, ldv(yb + j) + bo);
              if (j < n) storev_n(orow + j, loadv_n(yb + j, n - j) + bo, n - j);
            }
          }
        }
      }
    });
  }
}

// The entry points of this build (dtype dispatch; arguments were checked by the binding).
void conv1d_entry(const Conv1dArgs& a) {
  dispatch_float(a.x.dtype, "conv1d", "x", [&](auto d) { conv1d_impl<typename CpuType<decltype(d)::value>::type>(a); });
}
void conv_transpose1d_entry(const ConvTranspose1dArgs& a) {
  dispatch_float(a.x.dtype, "conv_transpose1d", "x",
                 [&](auto d) { conv_transpose1d_impl<typename CpuType<decltype(d)::value>::type>(a); });
}
