// Row-wise LLM ops (rms_norm / fused_add_rms_norm, silu_and_mul, the rotary embedding's rotation),
// built once per vector width: rowops.cpp (VITA_VW 8) and rowops_avx512.cpp (16); norm.cpp,
// activation.cpp and rope.cpp choose one at run time (cpu_isa.h).
//
// Every op computes in float32 and rounds to the storage dtype where torch's reference does
// (docs: ops/reference.py). Rows are independent; each is streamed with whole vectors and one
// partial vector at the end, so any hidden size works. No scratch rows are allocated: the norm's
// second pass re-reads its input (or the residual it just wrote), which is still in L1/L2.
//
// Included inside a private namespace after vecw_impl.h, "vita/kernels/elementwise.h" and
// "vita/parallel.h". No include guard on purpose.

// Rows per parallel task: about 64K elements, so a small batch (decode, T <= 16 at LLM widths)
// stays on one thread instead of paying for a pool hand-off that costs more than the row.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, (int64_t(1) << 16) / (n + 1)); }

template <class T>
void rms_norm_rows(const RmsNormArgs& a) {
  const int64_t H = a.x.size(-1);
  const int64_t rows = a.x.numel() / (H ? H : 1);
  if (rows == 0 || H == 0) return;
  const auto row_stride = [](const TensorRef& t) { return t.ndim >= 2 ? t.stride(-2) : int64_t(0); };
  const int64_t sx = row_stride(a.x), so = row_stride(a.out);
  const int64_t sr = a.fused_add ? row_stride(a.residual) : 0, sro = a.fused_add ? row_stride(a.residual_out) : 0;
  const T* X = a.x.ptr<T>();
  const T* R = a.fused_add ? a.residual.ptr<T>() : nullptr;
  const T* W = a.weight.ptr<T>();
  T* O = a.out.ptr<T>();
  T* RO = a.fused_add ? a.residual_out.ptr<T>() : nullptr;
  const int64_t Hv = H / VW * VW, tail = H - Hv;
  const bool fused = a.fused_add;
  const float eps = a.eps;
  parallel_for(rows, row_grain(H), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* x = X + r * sx;
      T* o = O + r * so;
      // Pass 1: the (rounded) residual sum, stored, and the sum of squares in four accumulators.
      vf s0 = vf{}, s1 = vf{}, s2 = vf{}, s3 = vf{};
      const T* src = x;  // what pass 2 normalises
      if (fused) {
        const T* res = R + r * sr;
        T* ro = RO + r * sro;
        int64_t i = 0;
        for (; i + VW <= Hv; i += VW) {
          const vf v = roundv<T>(loadv(x + i) + loadv(res + i));  // the residual stream lives in T
          storev(ro + i, v);
          s0 += v * v;
        }
        if (tail) {
          const vf v = roundv<T>(loadv_n(x + i, tail) + loadv_n(res + i, tail));
          storev_n(ro + i, v, tail);
          s1 += v * v;
        }
        src = ro;
      } else {
        int64_t i = 0;
        for (; i + 4 * VW <= Hv; i += 4 * VW) {
          const vf v0 = loadv(x + i), v1 = loadv(x + i + VW), v2 = loadv(x + i + 2 * VW), v3 = loadv(x + i + 3 * VW);
          s0 += v0 * v0;
          s1 += v1 * v1;
          s2 += v2 * v2;
          s3 += v3 * v3;
        }
        for (; i + VW <= Hv; i += VW) {
          const vf v = loadv(x + i);
          s0 += v * v;
        }
        if (tail) {
          const vf v = loadv_n(x + i, tail);
          s1 += v * v;
        }
      }
      const float ss = hsum((s0 + s1) + (s2 + s3));
      const float inv = 1.0f / std::sqrt(ss / float(H) + eps);
      // Pass 2: y = round_T(round_T(v * inv) * w), as the reference (normalise, cast, times weight).
      int64_t i = 0;
      for (; i + VW <= Hv; i += VW) storev(o + i, roundv<T>(loadv(src + i) * inv) * loadv(W + i));
      if (tail) storev_n(o + i, roundv<T>(loadv_n(src + i, tail) * inv) * loadv_n(W + i, tail), tail);
    }
  });
}

// silu(g) * u = g / (1 + exp(-g)) * u, one rounding at the store.
inline vf silu_mul_v(vf g, vf u) { return g / (1.0f + expv(-g)) * u; }

template <class T>
void silu_mul_rows(const SiluMulArgs& a) {
  const int64_t N = a.out.size(-1);
  const int64_t rows = a.out.numel() / (N ? N : 1);
  if (rows == 0 || N == 0) return;
  const int64_t sx = a.x.ndim >= 2 ? a.x.stride(-2) : 0, so = a.out.ndim >= 2 ? a.out.stride(-2) : 0;
  const T* X = a.x.ptr<T>();
  T* O = a.out.ptr<T>();
  // Tasks are column chunks of rows, so that one wide row (decode) still uses every thread.
  constexpr int64_t kChunk = 4096;
  const int64_t nch = ceil_div(N, kChunk);
  parallel_for(rows * nch, std::max<int64_t>(1, 8), [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / nch, c0 = (task % nch) * kChunk, c1 = std::min(N, c0 + kChunk);
      const T* g = X + r * sx;
      const T* u = g + N;
      T* o = O + r * so;
      int64_t i = c0;
      for (; i + VW <= c1; i += VW) storev(o + i, silu_mul_v(loadv(g + i), loadv(u + i)));
      if (i < c1) storev_n(o + i, silu_mul_v(loadv_n(g + i, c1 - i), loadv_n(u + i, c1 - i)), c1 - i);
    }
  });
}

// One head row of NeoX rope: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) on the first 2 * half channels,
// the rest copied (cs/sn already rounded to T, as the HF reference does). dst may alias src.
template <class T>
inline void rope_row(const T* src, T* dst, const float* cs, const float* sn, int half, int D) {
  int i = 0;
  for (; i + VW <= half; i += VW) {
    const vf x1 = loadv(src + i), x2 = loadv(src + i + half), c = ldv(cs + i), s = ldv(sn + i);
    storev(dst + i, x1 * c - x2 * s);
    storev(dst + i + half, x2 * c + x1 * s);
  }
  for (; i < half; ++i) {
    const float x1 = to_float(src[i]), x2 = to_float(src[i + half]);
    dst[i] = from_float<T>(x1 * cs[i] - x2 * sn[i]);
    dst[i + half] = from_float<T>(x2 * cs[i] + x1 * sn[i]);
  }
  if (dst != src)
    for (int j = 2 * half; j < D; ++j) dst[j] = src[j];
}

template <class T, class I>
void rope_rows(const RopeArgs& a) {
  const int64_t T_ = a.q.size(0);
  const int Hq = int(a.q.size(1)), Hk = int(a.k.size(1)), D = int(a.q.size(2));
  const int rd = a.rotary_dim, half = rd / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i)  // float32 like HF: 1 / theta ** (arange(0, rd, 2).float() / rd)
    inv_freq[i] = 1.0f / float(std::pow(double(a.theta), double(float(2 * i) / float(rd))));
  const I* pos = a.positions.ptr<I>();
  const int64_t pst = a.positions.stride(0);
  parallel_for(T_, std::max<int64_t>(1, 256 / (Hq + Hk)), [&](int64_t b, int64_t e) {
    std::vector<float> cs(half + VW), sn(half + VW);
    for (int64_t t = b; t < e; ++t) {
      const float p = float(pos[t * pst]);
      for (int i = 0; i < half; ++i) {
        const float ang = p * inv_freq[i];
        cs[i] = to_float(from_float<T>(std::cos(ang)));
        sn[i] = to_float(from_float<T>(std::sin(ang)));
      }
      for (int h = 0; h < Hq; ++h)
        rope_row(a.q.ptr<T>() + t * a.q.stride(0) + h * a.q.stride(1), a.q_out.ptr<T>() + t * a.q_out.stride(0) + h * a.q_out.stride(1),
                 cs.data(), sn.data(), half, D);
      for (int h = 0; h < Hk; ++h)
        rope_row(a.k.ptr<T>() + t * a.k.stride(0) + h * a.k.stride(1), a.k_out.ptr<T>() + t * a.k_out.stride(0) + h * a.k_out.stride(1),
                 cs.data(), sn.data(), half, D);
    }
  });
}

// The entry points of this build (dtype dispatch; arguments were checked by the binding).
void rms_norm_entry(const RmsNormArgs& a) {
  dispatch_float(a.x.dtype, "rms_norm", "x", [&](auto d) { rms_norm_rows<typename CpuType<decltype(d)::value>::type>(a); });
}
void silu_and_mul_entry(const SiluMulArgs& a) {
  dispatch_float(a.x.dtype, "silu_and_mul", "x", [&](auto d) { silu_mul_rows<typename CpuType<decltype(d)::value>::type>(a); });
}
void rotary_embedding_entry(const RopeArgs& a) {
  dispatch_float(a.q.dtype, "rotary_embedding", "q", [&](auto d) {
    using T = typename CpuType<decltype(d)::value>::type;
    dispatch_index(a.positions.dtype, "rotary_embedding", "positions", [&](auto i) { rope_rows<T, decltype(i)>(a); });
  });
}
