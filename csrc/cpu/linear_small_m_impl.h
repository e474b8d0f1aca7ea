// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for few rows (decode steps), built once per vector width:
// linear_small_m.cpp (VITA_VW 8) and linear_small_m_avx512.cpp (16).
//
// Why not torch's GEMM: at M <= 16 MKL/oneDNN reach a fraction of what streaming the weights once
// allows. Here each weight row is read from memory once: a block of NB = 4 rows (<= 4 x K floats,
// L1/L2 resident) is swept by every group of MB <= 4 input rows with NB x MB vector accumulators
// along K, reduced horizontally at the end (8 rows when M <= 2 in the AVX-512 build, where the kernel is
// bandwidth-bound and wants more streams in flight; software prefetch 0.5-2 KB ahead measured
// 3-20 % slower, the hardware prefetcher keeps up). The input rows are first widened to a zero-padded
// float32 copy (M x K, small), so the hot loop is plain loads + FMAs; bf16 weights are widened in
// registers. Threads split N in blocks of NB rows.
//
// Included inside a private namespace after vecw_impl.h, "vita/kernels/linear.h" and
// "vita/parallel.h". No include guard on purpose.

constexpr int kNBMax = 8;  // weight rows per block: 8 for M <= 2 (more streams and FMA chains), else 4
// Input rows per register tile: NB x MB accumulators + NB weight vectors + 1 input vector must fit the
// register file (32 zmm: 4 x 4; 16 ymm: 4 x 2, as 4 x 4 spilled and ran 0.9x torch at 16 rows).
constexpr int kMB = VW == 16 ? 4 : 2;
constexpr int kNBSmallM = VW == 16 ? 8 : 4;  // NB at M <= 2 under the same budget

// Horizontal sum in log2(VW) shuffle+add steps (vecw_impl.h's hsum is a lane loop, fine once per
// row but it costs as much as a K = 900 dot product here, where every output element needs one).
inline float lin_hsum(vf x) {
#if VITA_VW == 16
  return _mm512_reduce_add_ps(x);
#else
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#endif
}

// acc[n][m] += W[n, k0:k1] . X[m, k0:k1]; acc lives in memory between K chunks (the compiler keeps
// it in registers inside the loop). The last chunk ends with one partial weight vector (x is
// zero-padded to whole vectors, so its missing lanes are 0 rather than garbage times 0).
template <class T, int NB, int MB>
inline void lin_tile(const float* X, int64_t ldx, const T* W, int64_t K, int64_t k0, int64_t k1, vf* accm) {
  vf acc[NB][MB];
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) acc[n][m] = accm[n * kMB + m];
  const int64_t kv = k0 + (k1 - k0) / VW * VW;
  int64_t k = k0;
  for (; k < kv; k += VW) {
    vf w[NB];
    for (int n = 0; n < NB; ++n) w[n] = loadv(W + n * K + k);
    for (int m = 0; m < MB; ++m) {
      const vf xv = ldv(X + m * ldx + k);
      for (int n = 0; n < NB; ++n) acc[n][m] += w[n] * xv;
    }
  }
  if (k < k1) {
    vf w[NB];
    for (int n = 0; n < NB; ++n) w[n] = loadv_n(W + n * K + k, k1 - k);
    for (int m = 0; m < MB; ++m) {
      const vf xv = ldv(X + m * ldx + k);
      for (int n = 0; n < NB; ++n) acc[n][m] += w[n] * xv;
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) accm[n * kMB + m] = acc[n][m];
}

template <class T, int NB>
inline void lin_mrows(const float* X, int64_t ldx, int64_t mb, const T* W, int64_t K, int64_t k0, int64_t k1, vf* accm) {
  if constexpr (kMB == 2) {
    if (mb == 1)
      lin_tile<T, NB, 1>(X, ldx, W, K, k0, k1, accm);
    else
      lin_tile<T, NB, 2>(X, ldx, W, K, k0, k1, accm);
  } else {
    switch (mb) {
      case 1: lin_tile<T, NB, 1>(X, ldx, W, K, k0, k1, accm); break;
      case 2: lin_tile<T, NB, 2>(X, ldx, W, K, k0, k1, accm); break;
      case 3: lin_tile<T, NB, 3>(X, ldx, W, K, k0, k1, accm); break;
      default: lin_tile<T, NB, 4>(X, ldx, W, K, k0, k1, accm); break;
    }
  }
}

// Rows [n0, n0 + NB) of the output for all M input rows. K is cut into chunks whose slice of x
// (M rows) and of the NB weight rows fits in L1 together, so x is not re-read from L2 per block.
template <class T, int NB>
inline void lin_block(const float* X, int64_t ldx, int64_t M, const T* Wn, int64_t K, int64_t KC, float bias[], T* O, int64_t ldo) {
  vf acc[(kLinearMaxRows + kMB - 1) / kMB][NB * kMB];
  const int64_t mblocks = ceil_div(M, kMB);
  for (int64_t i = 0; i < mblocks; ++i)
    for (int j = 0; j < NB * kMB; ++j) acc[i][j] = vf{};
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = std::min(K, k0 + KC);
    for (int64_t i = 0; i < mblocks; ++i) {
      const int64_t m0 = i * kMB;
      lin_mrows<T, NB>(X + m0 * ldx, ldx, std::min<int64_t>(kMB, M - m0), Wn, K, k0, k1, acc[i]);
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int n = 0; n < NB; ++n) O[m * ldo + n] = from_float<T>(lin_hsum(acc[m / kMB][n * kMB + m % kMB]) + bias[n]);
}

template <class T>
void linear_small_m_t(const LinearArgs& a) {
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.w.size(0);
  if (M == 0 || N == 0) return;
  const T* W = a.w.ptr<T>();
  const T* B = a.bias.ndim >= 0 ? a.bias.ptr<T>() : nullptr;
  T* O = a.out.ptr<T>();
  const int64_t ldo = a.out.stride(0);
  // The float32, zero-padded copy of x (rows of Kp floats); float32 rows whose length is a whole
  // number of vectors are read in place.
  const int64_t Kp = ceil_div(std::max<int64_t>(K, 1), VW) * VW;
  const float* X;
  int64_t ldx;
  thread_local std::vector<float> xbuf;
  if (std::is_same_v<T, float> && K % VW == 0 && K > 0) {
    X = reinterpret_cast<const float*>(a.x.ptr<T>());
    ldx = a.x.stride(0);
  } else {
    xbuf.assign(size_t(M * Kp), 0.f);
    const T* xs = a.x.ptr<T>();
    for (int64_t m = 0; m < M; ++m) load_row(xs + m * a.x.stride(0), xbuf.data() + m * Kp, K);
    X = xbuf.data();
    ldx = Kp;
  }
  const int NB = M <= 2 ? kNBSmallM : 4;
  // K chunk: x slice (M x KC floats) + weight slice (NB x KC) within ~32 KB of L1.
  const int64_t per_k = 4 * M + NB * int64_t(sizeof(T));
  const int64_t KC = std::max<int64_t>(VW, (int64_t(32768) / per_k) / VW * VW);
  const int64_t blocks = ceil_div(N, NB);
  // About 256K multiply-adds per task: one block of a decode-width row (K ~ 900) at M = 16 is
  // ~60K, so small projections stay on one thread rather than pay for the pool hand-off.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (NB * std::max<int64_t>(K, 1) * M));
  parallel_for(blocks, grain, [&](int64_t b, int64_t e) {
    float bias[kNBMax];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk * NB, nb = std::min<int64_t>(NB, N - n0);
      for (int64_t n = 0; n < nb; ++n) bias[n] = B ? to_float(B[n0 + n]) : 0.f;
      const T* Wn = W + n0 * K;
      if (nb == 8) {
        lin_block<T, kNBSmallM>(X, ldx, M, Wn, K, KC, bias, O + n0, ldo);  // nb == 8 only when kNBSmallM is 8
      } else if (nb == 4) {
        lin_block<T, 4>(X, ldx, M, Wn, K, KC, bias, O + n0, ldo);
      } else {  // the last rows of N, one at a time
        for (int64_t n = 0; n < nb; ++n) lin_block<T, 1>(X, ldx, M, Wn + n * K, K, KC, bias + n, O + n0 + n, ldo);
      }
    }
  });
}

inline void linear_small_m_entry(const LinearArgs& a) {
  if (a.x.dtype == DType::kBFloat16)
    linear_small_m_t<bf16_t>(a);
  else
    linear_small_m_t<float>(a);
}
