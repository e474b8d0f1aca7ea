// CPU attention over a paged KV cache (decode, chunked prefill, continuation) and over
// contiguous packed sequences (encoder varlen attention).
//
// Algorithm (the same as the GPU's): one work item = (sequence, kv head, block of query tokens
// [, split of the key range]). The item owns every query head of its KV group for a block of query
// tokens (rows = tokens x group heads, <= kMaxRows), so each K/V row is read once per group.
// Keys are streamed in tiles of TK rows (16-bit K/V converted to float32 once per tile). Scores are
// computed transposed, S^T = K.Q^T (Q^T is built once per item), so the online softmax (max, sum,
// unnormalised O per row) runs down the keys with vertical vector ops. Causal masks are prefix
// masks per row (a per-lane key limit), skipped on row vectors that see the whole tile; fully
// masked rows give 0, never NaN. The next tile's K/V rows are prefetched while one is computed
// (paged rows defeat the hardware prefetcher).
// Long histories with few items are split over the key range; each split writes (m, l, O) partials
// that a second pass merges with log-sum-exp weights.
//
// Decode-sized items (few rows) read the cache rows in place: qk_block (KB keys x 2 row vectors)
// and pv_block (RB rows x 2 channel vectors). Query blocks (prefill) pack each tile: K^T
// (kt[d * TK + t], so qk_packed broadcasts 8 keys from one pointer into 8 x 3 row vectors) and V
// in column blocks of PW channels (pv_packed: 6 rows x PW channels), both L1-resident (paged rows
// sit at a large power-of-two stride and alias a few cache sets).
// bfloat16 query blocks on AVX512-BF16 CPUs (attention_avx512bf16.cpp, VITA_ATTN_BF16DP) use AMX
// tiles when the CPU and kernel allow (attend_amx: 256-key tiles, pairs of 16-row tiles), else
// vdpbf16ps (attend_dp); VITA_CPU_ISA=avx512bf16 skips AMX, =avx512 skips both, =avx2 forces the
// baseline.
//
// Varlen (encoder) calls with D a multiple of the vector width and sequences of at most 4096 tokens
// take the blocked tile path of attention_encoder_impl.h instead (exact per-row softmax over packed
// K^T / V); the driver below serves paged attention and the remaining varlen calls.
//
// This file is included by attention.cpp (VITA_ATTN_VW 8: AVX2 / generic), attention_avx512.cpp
// (VITA_ATTN_VW 16) and attention_avx512bf16.cpp (16, with VITA_ATTN_BF16DP), after <algorithm>, <cmath>, <cstring>, <limits>, <vector>, <immintrin.h>,
// "vec.h", "vita/kernels/attention.h" and "vita/parallel.h", inside a private namespace.
// No include guard on purpose.


constexpr int TK = 64;        // keys per tile
constexpr int kMaxRows = 512; // query rows per work item (query tokens x heads of one KV group)
constexpr int kMinSplitKeys = 512;
constexpr int TKA = 256;      // keys per tile of the AMX bf16 path
constexpr int kMaxRowsAmx = 2048;  // query rows per AMX work item when blocks are merged

// VITA_ATTN_VW floats per vector register (8: AVX2 / generic, 16: AVX-512), set by the includer.
constexpr int VW = VITA_ATTN_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
inline vf ldv(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void stv(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }

typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef int32_t viu __attribute__((vector_size(VW * 4), aligned(4)));

// exp(x) for x <= 0 on a whole vector (relative error ~2e-7); x = -inf gives ~1e-38 (callers mask).
inline vf exp_le0(vf x) {
  const vf lo = vf{} - 87.0f;
  x = x < lo ? lo : x;
  // round(x / ln2) with the 1.5 * 2^23 trick: the integer lands in the low mantissa bits of t
  const vf t = x * 1.44269504088896341f + 12582912.0f;
  const vf n = t - 12582912.0f;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  vf p = vf{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const vi e = ((vi)t - 0x4B400000 + 127) << 23;
  return p * (vf)e;
}

// Scores are kept transposed, st[t * ldp + r] (key-major, query rows in vector lanes): the
// softmax then runs down the keys with plain vertical vector ops, and K rows are used in their
// natural layout (no per-tile transpose). Q is transposed once per work item (qt[d * ldp + r]).

// st[k * ldp + rv + i * VW] = sum_d krow[k][d] * qt[d * ldp + rv + i * VW] for KB keys x NV row vectors.
template <int KB, int NV>
inline void qk_block(const float* qt, int ldp, int rv, const float* const* krow, int D, float* st) {
  vf acc[KB][NV];
  for (int k = 0; k < KB; ++k)
    for (int i = 0; i < NV; ++i) acc[k][i] = vf{};
  for (int d = 0; d < D; ++d) {
    vf q[NV];
    for (int i = 0; i < NV; ++i) q[i] = ldv(qt + size_t(d) * ldp + rv + i * VW);
    for (int k = 0; k < KB; ++k) {
      const float kv = krow[k][d];
      for (int i = 0; i < NV; ++i) acc[k][i] += kv * q[i];
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int i = 0; i < NV; ++i) stv(st + size_t(k) * ldp + rv + i * VW, acc[k][i]);
}

// Same product from a packed K^T tile (kt[d * TK + k], the block's keys contiguous): every key
// is a broadcast at a constant offset from one pointer, so the loop carries two address updates
// instead of one per key row, and NV row vectors share each broadcast.
template <int KB, int NV>
inline void qk_packed(const float* qt, int ldp, int rv, const float* kt, int D, float* st) {
  vf acc[KB][NV];
  for (int k = 0; k < KB; ++k)
    for (int i = 0; i < NV; ++i) acc[k][i] = vf{};
  const float* qp = qt + rv;
  for (int d = 0; d < D; ++d, qp += ldp, kt += TK) {
    vf q[NV];
    for (int i = 0; i < NV; ++i) q[i] = ldv(qp + i * VW);
    for (int k = 0; k < KB; ++k) {
      const float kv = kt[k];  // (vf{} + x would be an add, not a broadcast: -0.0 + 0.0 != -0.0)
      for (int i = 0; i < NV; ++i) acc[k][i] += kv * q[i];
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int i = 0; i < NV; ++i) stv(st + size_t(k) * ldp + rv + i * VW, acc[k][i]);
}

// Items with at most kDotRows rows (decode with one query head per KV head, as the TTS: 14/14
// heads) would fill one lane of each transposed row vector; attend_rows() keeps their scores per
// row along the keys instead.
constexpr int kDotRows = 4;

inline float hsum(vf x) {
#if VITA_ATTN_VW == 16
  const __m512 v = (__m512)x;
  const __m256 a = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));  // (no cast: GCC 12 warns)
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
#else
  float s[VW];
  stv(s, x);
  for (int w = VW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
#endif
}

// s[t] = q . krow[t] for t < n, D a multiple of VW; 4 keys at a time (independent chains).
inline void dot_keys(const float* q, const float* const* krow, int n, int D, float* s) {
  int t = 0;
  for (; t + 4 <= n; t += 4) {
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
    for (int d = 0; d < D; d += VW) {
      const vf qv = ldv(q + d);
      a0 += qv * ldv(krow[t] + d);
      a1 += qv * ldv(krow[t + 1] + d);
      a2 += qv * ldv(krow[t + 2] + d);
      a3 += qv * ldv(krow[t + 3] + d);
    }
    s[t] = hsum(a0);
    s[t + 1] = hsum(a1);
    s[t + 2] = hsum(a2);
    s[t + 3] = hsum(a3);
  }
  for (; t < n; ++t) {
    vf a = vf{};
    for (int d = 0; d < D; d += VW) a += ldv(q + d) * ldv(krow[t] + d);
    s[t] = hsum(a);
  }
}

// o[r * ldo + dc + j] += sum_{t < n} p[t * ldp + r] * vrow[t][dc + j] for R rows, 2 * VW channels.
template <int R>
inline void pv_block(const float* p, int ldp, const float* const* vrow, int n, int dc, float* o, int ldo) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = ldv(o + r * ldo + dc);
    acc[r][1] = ldv(o + r * ldo + dc + VW);
  }
  for (int t = 0; t < n; ++t) {
    const vf v0 = ldv(vrow[t] + dc), v1 = ldv(vrow[t] + dc + VW);
    for (int r = 0; r < R; ++r) {
      const float pr = p[size_t(t) * ldp + r];
      acc[r][0] += pr * v0;
      acc[r][1] += pr * v1;
    }
  }
  for (int r = 0; r < R; ++r) {
    stv(o + r * ldo + dc, acc[r][0]);
    stv(o + r * ldo + dc + VW, acc[r][1]);
  }
}

template <int R>
inline void pv_tail(const float* p, int ldp, const float* const* vrow, int n, int d0, int D, float* o, int ldo) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < n; ++t) {
      const float pr = p[size_t(t) * ldp + r];
      for (int d = d0; d < D; ++d) o[r * ldo + d] += pr * vrow[t][d];
    }
}

// Packed V column block (vb[t * PW + j], channels [c * PW, c * PW + PW) of the tile, zero past D):
// o[r * ldo + j] += sum_{t < n} p[t * ldp + r] * vb[t * PW + j] for R rows.
constexpr int PNV = VW == 16 ? 4 : 2;  // vectors per packed V column block
constexpr int PW = PNV * VW;           // its channels (AVX-512: 6 rows x 4 vectors = 24 accumulators)
template <int R>
inline void pv_packed(const float* p, int ldp, const float* vb, int n, float* o, int ldo) {
  vf acc[R][PNV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < PNV; ++i) acc[r][i] = ldv(o + r * ldo + i * VW);
  for (int t = 0; t < n; ++t) {
    vf v[PNV];
    for (int i = 0; i < PNV; ++i) v[i] = ldv(vb + t * PW + i * VW);
    const float* pt = p + size_t(t) * ldp;
    for (int r = 0; r < R; ++r) {
      const float pr = pt[r];
      for (int i = 0; i < PNV; ++i) acc[r][i] += pr * v[i];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < PNV; ++i) stv(o + r * ldo + i * VW, acc[r][i]);
}

// Register block of query rows for the micro-kernels: RB rows x 2 vectors of accumulators
// (AVX-512: 8 x 2 of 32 registers; AVX2: 6 x 2 of 16).
constexpr int RB = VW == 16 ? 8 : 6;

template <int K, class F>
inline void row_tail(int n, int r, F& f) {
  if constexpr (K >= 1) {
    if (n == K)
      f(r, std::integral_constant<int, K>{});
    else
      row_tail<K - 1>(n, r, f);
  }
}

// Calls f(r, integral_constant<R>) over rows [r0, M) in blocks of RBK (then one smaller block).
template <int RBK = RB, class F>
inline void row_groups(int r0, int M, F&& f) {
  int r = r0;
  for (; r + RBK <= M; r += RBK) f(r, std::integral_constant<int, RBK>{});
  if (r < M) row_tail<RBK - 1>(M - r, r, f);
}
constexpr int RBP = 6;  // rows per pv_packed block

constexpr int KB = VW == 16 ? 8 : 4;  // keys per S micro-kernel (x 2 row vectors of accumulators)

inline int round_rows(int M) { return (M + VW - 1) / VW * VW; }
// O scratch row stride: D rounded up to the packed V column block (PW channels, a multiple of 2 * VW).
inline int round_cols(int D) { return (D + PW - 1) / PW * PW; }

// dst[0, 2VW) = src[0, w) as float32, zero past w (one packed V column block row).
template <class T>
inline void pack_seg(const T* src, float* dst, int w) {
  if (w == 2 * VW) {
    if constexpr (std::is_same_v<T, float>) {
      stv(dst, ldv(src));
      stv(dst + VW, ldv(src + VW));
      return;
    } else if constexpr (std::is_same_v<T, bf16_t>) {
      typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2)));
      typedef uint32_t vu __attribute__((vector_size(VW * 4)));
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
      for (int i = 0; i < 2; ++i) {
        const vu u = __builtin_convertvector(*reinterpret_cast<const vh*>(s + i * VW), vu) << 16;
        stv(dst + i * VW, (vf)u);
      }
      return;
    }
  }
  load_row(src, dst, w);
  for (int j = w; j < 2 * VW; ++j) dst[j] = 0.f;
}

// dst[0, n) = src[0, n) as float32.
template <class T>
inline void pack_row(const T* src, float* dst, int n) {
  int i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) pack_seg(src + i, dst + i, 2 * VW);
  if (i < n) load_row(src + i, dst + i, n - i);
}

// Prefetch one cache row (n elements) into L2.
template <class T>
inline void prefetch_row(const T* p, int n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t b = 0; b < size_t(n) * sizeof(T); b += 64) __builtin_prefetch(c + b, 0, 2);
}

#if VITA_ATTN_VW == 16
// dst[c * ld + i] = src[i][c] for a 16 x 16 block of 32-bit words (rows src[i], 64 bytes each).
// (GCC 12's unpack intrinsics trip -Wmaybe-uninitialized on their internal _mm512_undefined, and
// -Wuninitialized where the encoder path inlines this into its K^T packing.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
inline void transpose16(const uint32_t* const* src, uint32_t* dst, int ld) {
  __m512i r[16], a[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src[i]);
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {  // r[4j + k], 128-bit lane L = column 4L + k of rows 4j..4j+3
    r[4 * j + 0] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
    r[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
    r[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
    r[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i c0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), c1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
    const __m512i c2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88), c3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
    _mm512_storeu_si512(dst + size_t(k) * ld, _mm512_shuffle_i32x4(c0, c2, 0x88));
    _mm512_storeu_si512(dst + size_t(4 + k) * ld, _mm512_shuffle_i32x4(c1, c3, 0x88));
    _mm512_storeu_si512(dst + size_t(8 + k) * ld, _mm512_shuffle_i32x4(c0, c2, 0xDD));
    _mm512_storeu_si512(dst + size_t(12 + k) * ld, _mm512_shuffle_i32x4(c1, c3, 0xDD));
  }
}
#pragma GCC diagnostic pop
#define VITA_ATTN_TRANSPOSE 1
inline void transpose_vw(const uint32_t* const* src, uint32_t* dst, int ld) { transpose16(src, dst, ld); }
#elif VITA_ATTN_VW == 8 && defined(__AVX__)
// dst[c * ld + i] = src[i][c] for an 8 x 8 block of 32-bit words (rows src[i], 32 bytes each): the
// AVX2 build's K^T packing, which otherwise stores one float at a time at a stride of ld floats.
inline void transpose8(const uint32_t* const* src, uint32_t* dst, int ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src[i]));
  for (int i = 0; i < 4; ++i) {  // t[2i] = (r[2i][0], r[2i+1][0], r[2i][1], r[2i+1][1] | same for 4, 5), t[2i+1]: 2, 3 | 6, 7
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3: r[4h + c] = column c | column c + 4
    const __m256 a = t[4 * h], b = t[4 * h + 1], c = t[4 * h + 2], d = t[4 * h + 3];
    r[4 * h + 0] = _mm256_shuffle_ps(a, c, 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(a, c, 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(b, d, 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(b, d, 0xEE);
  }
  float* o = reinterpret_cast<float*>(dst);
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(o + size_t(c) * ld, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(o + size_t(c + 4) * ld, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
}
#define VITA_ATTN_TRANSPOSE 1
inline void transpose_vw(const uint32_t* const* src, uint32_t* dst, int ld) { transpose8(src, dst, ld); }
#endif

struct Scratch {
  std::vector<float> q, qt, qr, o, m, l, alpha, st, kn, kt, vn, vp, zero;
#if defined(VITA_ATTN_BF16DP)
  std::vector<uint32_t> qt2, pb, vb2, kbt, vv;
  std::vector<uint16_t> kb16, qa, pa;
  std::vector<float> s2;
#endif
  std::vector<int64_t> lim;
  std::vector<const float*> kh;  // attend_heads: per-head key rows, and each row's head
  std::vector<int> head_of;
  std::vector<int32_t> limi;
  std::vector<const float*> bias;
  std::vector<int64_t> bias_stride;
  bool bias_shared = false;  // every row of the item reads the same bias row (one query head per item)
  // bf16: also the buffers of the bf16 dot-product / AMX paths (query blocks only).
  Scratch(int rows, int D, bool bf16 = false)
      // (+16 rows: the AMX path works on pairs of 16-row tiles)
      : q(size_t(D)), qt(size_t(D) * round_rows(rows)), qr(size_t(D) * rows), o(size_t(round_rows(rows) + 16) * round_cols(D)), m(round_rows(rows) + 16),
        l(round_rows(rows) + 16), alpha(round_rows(rows)), st(size_t(TK) * round_rows(rows)), kn(size_t(TK) * D), kt(size_t(TK) * D),
        vn(size_t(TK) * D), vp(size_t(TK) * round_cols(D)), zero(D + 8, 0.f), lim(rows), limi(round_rows(rows) + 16), bias(rows),
        bias_stride(rows) {
#if defined(VITA_ATTN_BF16DP)
    if (!bf16) return;
    qt2.resize(size_t(D / 2) * round_rows(rows));
    pb.resize(size_t(TK / 2) * round_rows(rows));
    vb2.resize(size_t(TK / 2) * round_cols(D));
    kb16.resize(size_t(TK) * D);
    kbt.resize(size_t(D / 2) * TKA);
    vv.resize(size_t(TKA / 2) * D);
    qa.resize(size_t(round_rows(rows) + 16) * D);
    pa.resize(size_t(32) * TKA);
    s2.resize(size_t(32) * TKA);
#endif
  }
};

// Online softmax: scale the accumulated output rows [r0, M) by their alpha = exp(m_old - m_new).
inline void rescale_rows(float* O, const float* alpha, int r0, int M, int Dp) {
  for (int r = r0; r < M; ++r) {
    const float a = alpha[r];
    if (a != 1.0f) {
      float* o = O + size_t(r) * Dp;
#pragma omp simd
      for (int d = 0; d < Dp; ++d) o[d] *= a;
    }
  }
}

// Streams keys [k_begin, k_end) of one (sequence, kv head) through the M query rows held in sc
// (qt = scaled Q transposed with ldp = round_rows(M) lanes, padding lanes zero with limi 0;
// lim = per-row exclusive key limit, non-decreasing). koff/voff map a key index to its element
// offset in kc/vc. Updates sc.o / sc.m / sc.l (online softmax state).
template <class T, class KOff, class VOff>
void attend(const T* kc, const T* vc, KOff koff, VOff voff, int64_t k_begin, int64_t k_end, int M, int D, bool has_bias,
            Scratch& sc) {
  const float* krow[TK];
  const float* vrow[TK];
  const int ldp = round_rows(M);
  float* O = sc.o.data();
  float* St = sc.st.data();
  const int DV = D - D % (2 * VW);
  constexpr int W = 2 * VW;
  const int Dp = round_cols(D), nc = Dp / PW;  // O row stride, packed V column blocks
  // Query blocks (prefill): K rows copied into a contiguous tile and V into column blocks of W
  // channels, so that both stay in L1 (paged rows sit at a large power-of-two stride and alias
  // a few cache sets) and every row group reuses the same V slice. Decode (few rows) streams the
  // cache rows directly: there the copy would cost as much as the compute.
  const bool pack = M > W;
  const vf ninf = vf{} - std::numeric_limits<float>::infinity();
  for (int64_t t0 = k_begin; t0 < k_end; t0 += TK) {
    const int n = int(std::min<int64_t>(TK, k_end - t0));
    int r0 = 0;  // rows [0, r0) see no key of this tile (causal prefix)
    while (r0 < M && sc.lim[r0] <= t0) ++r0;
    if (r0 == M) break;
    const int rb0 = r0 / VW * VW;
    // ---- tile rows (16-bit K/V converted to float32 once)
    for (int t = 0; t < n; ++t) {
      const T* kp = kc + koff(t0 + t);
      const T* vp = vc + voff(t0 + t);
      if (t0 + TK + t < k_end) {  // the next tile's rows into L2 while this one is computed
        prefetch_row(kc + koff(t0 + TK + t), D);
        prefetch_row(vc + voff(t0 + TK + t), D);
      }
      if (pack) {
        pack_row(kp, sc.kn.data() + size_t(t) * D, D);
        krow[t] = sc.kn.data() + size_t(t) * D;
        for (int c = 0; c < nc; ++c)
          for (int s = 0; s < PW; s += W)
            pack_seg(vp + c * PW + s, sc.vp.data() + (size_t(c) * TK + t) * PW + s, std::clamp(D - c * PW - s, 0, W));
      } else if constexpr (std::is_same_v<T, float>) {
        krow[t] = kp;
        vrow[t] = vp;
      } else {
        load_row(kp, sc.kn.data() + size_t(t) * D, D);
        load_row(vp, sc.vn.data() + size_t(t) * D, D);
        krow[t] = sc.kn.data() + size_t(t) * D;
        vrow[t] = sc.vn.data() + size_t(t) * D;
      }
    }
    const int np = (n + KB - 1) / KB * KB;
    for (int t = n; t < np; ++t) krow[t] = sc.zero.data();
    // ---- S^T = K Q^T
    // keys in sub-tiles of QKT (their K rows stay in L1 next to one Q^T slice), row-vector groups
    // (one Q^T slice, reused by every key block of the sub-tile), key blocks innermost
    constexpr int QKT = 32;
    if (pack) {  // K^T tile, zero past n
      float* kt = sc.kt.data();
#if defined(VITA_ATTN_TRANSPOSE)
      if (D % VW == 0) {
        static_assert(TK % VW == 0, "K^T tiles transpose VW keys at a time");
        for (int t = np; t < (np + VW - 1) / VW * VW; ++t) krow[t] = sc.zero.data();
        for (int tb = 0; tb < np; tb += VW)
          for (int d = 0; d < D; d += VW) {
            const uint32_t* src[VW];
            for (int i = 0; i < VW; ++i) src[i] = reinterpret_cast<const uint32_t*>(krow[tb + i] + d);
            transpose_vw(src, reinterpret_cast<uint32_t*>(kt + size_t(d) * TK + tb), TK);
          }
      } else
#endif
        for (int t = 0; t < np; ++t)
          for (int d = 0; d < D; ++d) kt[size_t(d) * TK + t] = krow[t][d];
      constexpr int NV3 = VW == 16 ? 3 : 2;  // AVX-512: 8 keys x 3 vectors = 24 accumulators
      for (int tq = 0; tq < np; tq += QKT) {
        const int te = std::min(np, tq + QKT);
        int rv = rb0;
        for (; rv + NV3 * VW <= ldp; rv += NV3 * VW)
          for (int t = tq; t < te; t += KB) qk_packed<KB, NV3>(sc.qt.data(), ldp, rv, kt + t, D, St + size_t(t) * ldp);
        for (; rv + VW <= ldp; rv += VW)
          for (int t = tq; t < te; t += KB) qk_packed<KB, 1>(sc.qt.data(), ldp, rv, kt + t, D, St + size_t(t) * ldp);
      }
    } else
    for (int tq = 0; tq < np; tq += QKT) {
      const int te = std::min(np, tq + QKT);
      int rv = rb0;
      for (; rv + 2 * VW <= ldp; rv += 2 * VW)
        for (int t = tq; t < te; t += KB) qk_block<KB, 2>(sc.qt.data(), ldp, rv, krow + t, D, St + size_t(t) * ldp);
      if (rv < ldp)
        for (int t = tq; t < te; t += KB) qk_block<KB, 1>(sc.qt.data(), ldp, rv, krow + t, D, St + size_t(t) * ldp);
    }
    if (has_bias && sc.bias_shared) {
      // one bias value per key for every row: a broadcast added to whole row vectors (padding
      // lanes and rows before r0 get it too; their keys are masked in the softmax anyway)
      const float* b = sc.bias[r0];
      const int64_t bst = sc.bias_stride[r0];
      for (int t = 0; t < n; ++t) {
        const vf bv = vf{} + b[(t0 + t) * bst];
        float* sp = St + size_t(t) * ldp;
        for (int rv = rb0; rv < ldp; rv += VW) stv(sp + rv, ldv(sp + rv) + bv);
      }
    } else if (has_bias) {
      for (int r = r0; r < M; ++r) {
        const float* b = sc.bias[r];
        const int64_t bst = sc.bias_stride[r];
        for (int t = 0; t < n; ++t) St[size_t(t) * ldp + r] += b[(t0 + t) * bst];
      }
    }
    // ---- online softmax, query rows in lanes (keys >= a row's limit get p = 0)
    const int32_t tile_end = int32_t(t0 + n);
    auto softmax_rows = [&](int rv, auto masked) {
      const vi limv = *reinterpret_cast<const viu*>(sc.limi.data() + rv);
      vf mx = ninf;
      for (int t = 0; t < n; ++t) {
        const vf sv = ldv(St + size_t(t) * ldp + rv);
        if constexpr (decltype(masked)::value) {
          const vi tv = vi{} + int32_t(t0 + t);
          const vf sm = tv < limv ? sv : ninf;
          mx = mx > sm ? mx : sm;
        } else {
          mx = mx > sv ? mx : sv;
        }
      }
      const vf mo = ldv(sc.m.data() + rv);
      const vf mn = mo > mx ? mo : mx;
      const vf mu = mn == ninf ? vf{} : mn;  // lanes with no key yet: any finite offset
      const vf alpha = exp_le0(mo - mu);     // ~0 for fresh lanes (m = -inf), 1 when the max is unchanged
      vf sum = vf{};
      for (int t = 0; t < n; ++t) {
        float* sp = St + size_t(t) * ldp + rv;
        vf e = exp_le0(ldv(sp) - mu);
        if constexpr (decltype(masked)::value) {
          const vi tv = vi{} + int32_t(t0 + t);
          e = tv < limv ? e : vf{};
        }
        stv(sp, e);
        sum += e;
      }
      stv(sc.l.data() + rv, ldv(sc.l.data() + rv) * alpha + sum);
      stv(sc.m.data() + rv, mn);
      stv(sc.alpha.data() + rv, alpha);
    };
    for (int rv = rb0; rv < ldp; rv += VW) {
      // limits are non-decreasing over real rows and 0 on padding lanes: the first and last lane
      // bound the vector, and a vector whose every lane sees the whole tile skips the masks
      if (sc.limi[rv] >= tile_end && sc.limi[rv + VW - 1] >= tile_end)
        softmax_rows(rv, std::false_type{});
      else
        softmax_rows(rv, std::true_type{});
    }
    rescale_rows(O, sc.alpha.data(), r0, M, Dp);
    // ---- O += P V
    if (pack) {  // column block outer: its V slice (TK x W floats) stays in L1 for every row group
      for (int c = 0; c < nc; ++c) {
        const float* vb = sc.vp.data() + size_t(c) * TK * PW;
        row_groups<RBP>(r0, M, [&](int r, auto R) {
          pv_packed<decltype(R)::value>(St + r, ldp, vb, n, O + size_t(r) * Dp + c * PW, Dp);
        });
      }
    } else {
      row_groups(r0, M, [&](int r, auto R) {
        constexpr int RR = decltype(R)::value;
        for (int dc = 0; dc < DV; dc += 2 * VW) pv_block<RR>(St + r, ldp, vrow, n, dc, O + size_t(r) * Dp, Dp);
        if (DV < D) pv_tail<RR>(St + r, ldp, vrow, n, DV, D, O + size_t(r) * Dp, Dp);
      });
    }
  }
}


// attend() for items of at most kDotRows rows (same contract, D a multiple of VW): the scores of
// a row are kept along the keys (s[t]), so the dot products, the online softmax and P.V all run
// over keys or channels in whole vectors. Keys >= a row's limit are excluded (causal).
// One row's online-softmax step over a key tile, shared by attend_rows() and attend_heads():
// s[0, nr) holds the row's scores of the tile's first nr keys (nr >= 1; the keys it may see), nv
// (a multiple of VW, >= nr) how many entries the caller will read. Adds the key bias, turns s into
// p (masked and padding keys exactly 0), and rescales the row's running max, sum and output.
inline void softmax_row_update(Scratch& sc, int r, float* s, int nr, int nv, int64_t t0, bool has_bias, vi lane, int Dp) {
  if (has_bias) {
    const float* b = sc.bias[r];
    const int64_t bst = sc.bias_stride[r];
    for (int t = 0; t < nr; ++t) s[t] += b[(t0 + t) * bst];
  }
  for (int t = nr; t < nv; ++t) s[t] = -std::numeric_limits<float>::infinity();
  vf mv = ldv(s);
  for (int t = VW; t < nv; t += VW) {
    const vf x = ldv(s + t);
    mv = mv > x ? mv : x;
  }
  float mx = mv[0];
  for (int i = 1; i < VW; ++i) mx = std::max(mx, mv[i]);
  const float mo = sc.m[r], mn = std::max(mo, mx);
  const float alpha = mo == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(mo - mn);
  vf sum = vf{};
  for (int t = 0; t < nv; t += VW) {
    vf e = exp_le0(ldv(s + t) - mn);
    e = (lane + t) < nr ? e : vf{};  // padding keys: exactly 0
    stv(s + t, e);
    sum += e;
  }
  sc.l[r] = sc.l[r] * alpha + hsum(sum);
  sc.m[r] = mn;
  rescale_rows(sc.o.data(), &alpha, r, r + 1, Dp);
}

template <class T, class KOff, class VOff>
void attend_rows(const T* kc, const T* vc, KOff koff, VOff voff, int64_t k_begin, int64_t k_end, int M, int D, bool has_bias,
                 Scratch& sc) {
  const float* krow[TK];
  const float* vrow[TK];
  const int ldp = round_rows(M), Dp = round_cols(D);
  const int DV = D - D % (2 * VW);
  for (int r = 0; r < M; ++r)  // row-major scaled Q (qt holds it transposed)
    for (int d = 0; d < D; ++d) sc.qr[size_t(r) * D + d] = sc.qt[size_t(d) * ldp + r];
  float* s = sc.st.data();  // one row's scores, TK floats (+ VW of padding)
  vi lane;
  for (int i = 0; i < VW; ++i) lane[i] = i;
  for (int64_t t0 = k_begin; t0 < k_end; t0 += TK) {
    const int n = int(std::min<int64_t>(TK, k_end - t0));
    if (sc.lim[M - 1] <= t0) break;  // limits are non-decreasing: no row sees these keys
    for (int t = 0; t < n; ++t) {
      const T* kp = kc + koff(t0 + t);
      const T* vp = vc + voff(t0 + t);
      if (t0 + TK + t < k_end) {
        prefetch_row(kc + koff(t0 + TK + t), D);
        prefetch_row(vc + voff(t0 + TK + t), D);
      }
      if constexpr (std::is_same_v<T, float>) {
        krow[t] = kp;
        vrow[t] = vp;
      } else {
        load_row(kp, sc.kn.data() + size_t(t) * D, D);
        load_row(vp, sc.vn.data() + size_t(t) * D, D);
        krow[t] = sc.kn.data() + size_t(t) * D;
        vrow[t] = sc.vn.data() + size_t(t) * D;
      }
    }
    for (int r = 0; r < M; ++r) {
      const int nr = int(std::clamp<int64_t>(sc.lim[r] - t0, 0, n));  // this row's keys: a prefix of the tile
      if (nr == 0) continue;
      dot_keys(sc.qr.data() + size_t(r) * D, krow, nr, D, s);
      softmax_row_update(sc, r, s, nr, (nr + VW - 1) / VW * VW, t0, has_bias, lane, Dp);
      float* o = sc.o.data() + size_t(r) * Dp;
      for (int dc = 0; dc < DV; dc += 2 * VW) pv_block<1>(s, 1, vrow, nr, dc, o, Dp);
      if (DV < D) pv_tail<1>(s, 1, vrow, nr, DV, D, o, Dp);
    }
  }
}

// attend_rows() for items of nh > 1 KV heads (rows hi * Mg .. (hi + 1) * Mg - 1 belong to head hi;
// koff/voff take (hi, t) and are linear in hi). Decode with one query head per KV head (the TTS:
// 14/14 x 64) is bound by fetching the cache, not by arithmetic: walking one head's slice of every
// row (a 256-byte piece at a 3.5 KB stride) keeps few lines in flight, so this walks the keys in
// memory order instead: for each key, the dot products (then the P.V updates) of every head, the
// row of all heads read once from start to end, which the hardware prefetcher streams.
template <class T, class KOff, class VOff>
void attend_heads(const T* kc, const T* vc, KOff koff, VOff voff, int64_t k_begin, int64_t k_end, int Mg, int nh, int D,
                  bool has_bias, Scratch& sc) {
  const int M = Mg * nh;
  const int ldp = round_rows(M), Dp = round_cols(D);
  constexpr int LS = TK + VW;  // scores of row r: s[r * LS + t] (+ padding to whole vectors)
  if (sc.st.size() < size_t(M) * LS) sc.st.resize(size_t(M) * LS);
  if (sc.kn.size() < size_t(nh) * D) sc.kn.resize(size_t(nh) * D);
  // One key's row, per head (converted to float32 in kn), and each row's head, computed once instead
  // of an integer division (Mg is a run-time value) per row and key. Kept in the scratch, which a
  // thread reuses for all its items, so an item allocates nothing.
  if (sc.kh.size() < size_t(nh)) sc.kh.resize(size_t(nh));
  if (sc.head_of.size() < size_t(M)) sc.head_of.resize(size_t(M));
  const float** kh = sc.kh.data();
  int* head_of = sc.head_of.data();
  for (int r = 0; r < M; ++r) head_of[r] = r / Mg;
  float* s = sc.st.data();
  for (int r = 0; r < M; ++r)  // row-major scaled Q (qt holds it transposed)
    for (int d = 0; d < D; ++d) sc.qr[size_t(r) * D + d] = sc.qt[size_t(d) * ldp + r];
  const int64_t khs = koff(1, k_begin) - koff(0, k_begin), vhs = voff(1, k_begin) - voff(0, k_begin);
  auto as_float = [&](const T* p, float* tmp) -> const float* {
    if constexpr (std::is_same_v<T, float>) {
      (void)tmp;
      return p;
    } else {
      load_row(p, tmp, D);
      return tmp;
    }
  };
  vi lane;
  for (int i = 0; i < VW; ++i) lane[i] = i;
  for (int64_t t0 = k_begin; t0 < k_end; t0 += TK) {
    const int n = int(std::min<int64_t>(TK, k_end - t0));
    if (sc.lim[M - 1] <= t0) break;  // limits are non-decreasing (the same for every head): no row sees these keys
    for (int t = 0; t < n; ++t) {
      const T* kp = kc + koff(0, t0 + t);
      for (int hi = 0; hi < nh; ++hi) kh[hi] = as_float(kp + hi * khs, sc.kn.data() + size_t(hi) * D);
      int r = 0;
      for (; r + 4 <= M; r += 4) {  // 4 rows (of up to 4 heads) at a time: independent chains
        vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
        const float* q0 = sc.qr.data() + size_t(r) * D;
        const float *k0 = kh[head_of[r]], *k1 = kh[head_of[r + 1]], *k2 = kh[head_of[r + 2]], *k3 = kh[head_of[r + 3]];
        for (int d = 0; d < D; d += VW) {
          a0 += ldv(q0 + d) * ldv(k0 + d);
          a1 += ldv(q0 + D + d) * ldv(k1 + d);
          a2 += ldv(q0 + 2 * D + d) * ldv(k2 + d);
          a3 += ldv(q0 + 3 * D + d) * ldv(k3 + d);
        }
        s[r * LS + t] = hsum(a0);
        s[(r + 1) * LS + t] = hsum(a1);
        s[(r + 2) * LS + t] = hsum(a2);
        s[(r + 3) * LS + t] = hsum(a3);
      }
      for (; r < M; ++r) {
        vf a = vf{};
        const float *q0 = sc.qr.data() + size_t(r) * D, *k = kh[head_of[r]];
        for (int d = 0; d < D; d += VW) a += ldv(q0 + d) * ldv(k + d);
        s[r * LS + t] = hsum(a);
      }
    }
    for (int r = 0; r < M; ++r) {  // online softmax per row; masked and padding keys get p = 0
      float* sr = s + r * LS;
      const int nr = int(std::clamp<int64_t>(sc.lim[r] - t0, 0, n));
      if (nr == 0) {
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      softmax_row_update(sc, r, sr, nr, (n + VW - 1) / VW * VW, t0, has_bias, lane, Dp);
    }
    for (int t = 0; t < n; ++t) {
      const T* vp = vc + voff(0, t0 + t);
      for (int hi = 0; hi < nh; ++hi) {
        const float* v = as_float(vp + hi * vhs, sc.kn.data());
        for (int r = hi * Mg; r < (hi + 1) * Mg; ++r) {
          const vf p = vf{} + s[r * LS + t];
          float* o = sc.o.data() + size_t(r) * Dp;
          for (int d = 0; d < D; d += VW) stv(o + d, ldv(o + d) + p * ldv(v + d));
        }
      }
    }
  }
}

#if defined(VITA_ATTN_BF16DP)
// ---- bfloat16 prefill with AVX512-BF16 (vdpbf16ps: 2 bf16 products per float lane, float32
// accumulation). Only built by attention_avx512bf16.cpp and used for bf16 query blocks without
// bias. Operands are "pair words" (uint32: element 2i in the low half, 2i+1 in the high half):
// Q^T pairs qt2[dp * ldp + r] = (Q[r][2dp], Q[r][2dp+1]) (unscaled, exact input values; the scale
// is applied to the float32 scores), K rows used as they are (a broadcast word = 2 channels),
// P pairs pb[tp * ldp + r] = (P[2tp][r], P[2tp+1][r]) rounded to bf16 (the row sum uses the same
// rounded values), V pairs per column block vb2[(c * TK/2 + tp) * W + j] = (V[2tp][cW+j], V[2tp+1][cW+j]).
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint32_t vuu __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2)));

inline vf dpbf(vf acc, vf a, vf b) { return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b); }
inline vf bcast_word(uint32_t w) { return (vf)(vu{} + w); }
inline vu bf16_rne(vf x) {  // finite x -> bf16 bits in the low half of each lane
  const vu u = (vu)x;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

template <int KB_, int NV>
inline void qk_dp(const uint32_t* qt2, int ldp, int rv, const uint16_t* const* krow, int D, float* st) {
  vf acc[KB_][NV];
  for (int k = 0; k < KB_; ++k)
    for (int i = 0; i < NV; ++i) acc[k][i] = vf{};
  for (int dp = 0; dp < D / 2; ++dp) {
    vf q[NV];
    for (int i = 0; i < NV; ++i) q[i] = ldv(reinterpret_cast<const float*>(qt2 + size_t(dp) * ldp + rv + i * VW));
    for (int k = 0; k < KB_; ++k) {
      uint32_t w;
      std::memcpy(&w, krow[k] + 2 * dp, 4);
      const vf kw = bcast_word(w);
      for (int i = 0; i < NV; ++i) acc[k][i] = dpbf(acc[k][i], kw, q[i]);
    }
  }
  for (int k = 0; k < KB_; ++k)
    for (int i = 0; i < NV; ++i) stv(st + size_t(k) * ldp + rv + i * VW, acc[k][i]);
}

template <int R>
inline void pv_dp(const uint32_t* pb, int ldp, const uint32_t* vb, int n2, float* o, int ldo) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = ldv(o + r * ldo);
    acc[r][1] = ldv(o + r * ldo + VW);
  }
  for (int tp = 0; tp < n2; ++tp) {
    const vf v0 = ldv(reinterpret_cast<const float*>(vb + tp * 2 * VW));
    const vf v1 = ldv(reinterpret_cast<const float*>(vb + tp * 2 * VW + VW));
    const uint32_t* pt = pb + size_t(tp) * ldp;
    for (int r = 0; r < R; ++r) {
      const vf pr = bcast_word(pt[r]);
      acc[r][0] = dpbf(acc[r][0], pr, v0);
      acc[r][1] = dpbf(acc[r][1], pr, v1);
    }
  }
  for (int r = 0; r < R; ++r) {
    stv(o + r * ldo, acc[r][0]);
    stv(o + r * ldo + VW, acc[r][1]);
  }
}

// attend() for bf16 with the dot-product kernels (same contract; sc.qt2 holds the Q^T pairs and
// scores are multiplied by `scale`).
template <class KOff, class VOff>
void attend_dp(const bf16_t* kc, const bf16_t* vc, KOff koff, VOff voff, int64_t k_begin, int64_t k_end, int M, int D, float scale,
               Scratch& sc) {
  constexpr int W = 2 * VW;
  const uint16_t* krow[TK];
  const int ldp = round_rows(M);
  const int Dp = round_cols(D), nc = Dp / W;
  float* O = sc.o.data();
  float* St = sc.st.data();
  uint32_t* pb = sc.pb.data();
  uint32_t* vb2 = sc.vb2.data();
  uint16_t* kt = sc.kb16.data();
  const vf ninf = vf{} - std::numeric_limits<float>::infinity();
  const uint16_t* zero16 = reinterpret_cast<const uint16_t*>(sc.zero.data());
  for (int64_t t0 = k_begin; t0 < k_end; t0 += TK) {
    const int n = int(std::min<int64_t>(TK, k_end - t0));
    const int n2 = (n + 1) / 2;
    int r0 = 0;
    while (r0 < M && sc.lim[r0] <= t0) ++r0;
    if (r0 == M) break;
    const int rb0 = r0 / VW * VW;
    // ---- K rows copied (bf16, contiguous), V rows interleaved in pairs per column block
    for (int t = 0; t < n; ++t) {
      if (t0 + TK + t < k_end) {
        prefetch_row(kc + koff(t0 + TK + t), D);
        prefetch_row(vc + voff(t0 + TK + t), D);
      }
      std::memcpy(kt + size_t(t) * D, kc + koff(t0 + t), sizeof(uint16_t) * D);
      krow[t] = kt + size_t(t) * D;
    }
    for (int tp = 0; tp < n2; ++tp) {
      const uint16_t* va = reinterpret_cast<const uint16_t*>(vc + voff(t0 + 2 * tp));
      const uint16_t* vbr = 2 * tp + 1 < n ? reinterpret_cast<const uint16_t*>(vc + voff(t0 + 2 * tp + 1)) : zero16;
      for (int c = 0; c < nc; ++c) {
        uint32_t* dst = vb2 + (size_t(c) * (TK / 2) + tp) * W;
        if (c * W + W <= D) {
          for (int i = 0; i < 2; ++i) {
            const vu lo = __builtin_convertvector(*reinterpret_cast<const vh*>(va + c * W + i * VW), vu);
            const vu hi = __builtin_convertvector(*reinterpret_cast<const vh*>(vbr + c * W + i * VW), vu);
            *reinterpret_cast<vuu*>(dst + i * VW) = lo | (hi << 16);
          }
        } else {
          for (int j = 0; j < W; ++j) {
            const int d = c * W + j;
            dst[j] = d < D ? uint32_t(va[d]) | (uint32_t(vbr[d]) << 16) : 0u;
          }
        }
      }
    }
    const int np = (n + KB - 1) / KB * KB;
    for (int t = n; t < np; ++t) krow[t] = zero16;
    // ---- S^T = K Q^T (unscaled)
    constexpr int QKT = 32;
    for (int tq = 0; tq < np; tq += QKT) {
      const int te = std::min(np, tq + QKT);
      int rv = rb0;
      for (; rv + 2 * VW <= ldp; rv += 2 * VW)
        for (int t = tq; t < te; t += KB) qk_dp<KB, 2>(sc.qt2.data(), ldp, rv, krow + t, D, St + size_t(t) * ldp);
      if (rv < ldp)
        for (int t = tq; t < te; t += KB) qk_dp<KB, 1>(sc.qt2.data(), ldp, rv, krow + t, D, St + size_t(t) * ldp);
    }
    // ---- online softmax; P rounded to bf16 and stored in pairs
    for (int rv = rb0; rv < ldp; rv += VW) {
      const vi limv = *reinterpret_cast<const viu*>(sc.limi.data() + rv);
      vf mx = ninf;
      for (int t = 0; t < n; ++t) {
        const vf sv = ldv(St + size_t(t) * ldp + rv) * scale;
        const vi tv = vi{} + int32_t(t0 + t);
        const vf sm = tv < limv ? sv : ninf;
        mx = mx > sm ? mx : sm;
      }
      const vf mo = ldv(sc.m.data() + rv);
      const vf mn = mo > mx ? mo : mx;
      const vf mu = mn == ninf ? vf{} : mn;
      const vf alpha = exp_le0(mo - mu);
      vf sum = vf{};
      for (int tp = 0; tp < n2; ++tp) {
        const int t = 2 * tp;
        const vi tv = vi{} + int32_t(t0 + t);
        vf e0 = exp_le0(ldv(St + size_t(t) * ldp + rv) * scale - mu);
        e0 = tv < limv ? e0 : vf{};
        vf e1 = vf{};
        if (t + 1 < n) {
          e1 = exp_le0(ldv(St + size_t(t + 1) * ldp + rv) * scale - mu);
          e1 = (tv + 1) < limv ? e1 : vf{};
        }
        const vu b0 = bf16_rne(e0), b1 = bf16_rne(e1);
        sum += (vf)(b0 << 16) + (vf)(b1 << 16);
        *reinterpret_cast<vuu*>(pb + size_t(tp) * ldp + rv) = b0 | (b1 << 16);
      }
      stv(sc.l.data() + rv, ldv(sc.l.data() + rv) * alpha + sum);
      stv(sc.m.data() + rv, mn);
      stv(sc.alpha.data() + rv, alpha);
    }
    rescale_rows(O, sc.alpha.data(), r0, M, Dp);
    // ---- O += P V
    for (int c = 0; c < nc; ++c) {
      const uint32_t* vb = vb2 + size_t(c) * (TK / 2) * W;
      row_groups(r0, M, [&](int r, auto R) {
        pv_dp<decltype(R)::value>(pb + r, ldp, vb, n2, O + size_t(r) * Dp + c * W, Dp);
      });
    }
  }
}

// ---- bfloat16 prefill with AMX tiles (TDPBF16PS, float32 accumulation), when the CPU has
// AMX-BF16 and the kernel granted tile data (arch_prctl ARCH_REQ_XCOMP_PERM). Scores in natural
// layout S[r][t] = Q K^T: A = Q rows (qa[r * D + d], unscaled bf16), B = K^T pair words
// (kbt[dp * TK + t] = (K[t][2dp], K[t][2dp+1])). Row softmax on S (scale applied in float32),
// P rounded to bf16 row-major (pa[r * TK + t]); O[r][c] += P V with B = V pair words
// (vv[tp * D + c] = (V[2tp][c], V[2tp+1][c])), C tiles loaded from / stored to O (float32).
// All eight tiles are 16 rows x 64 bytes. Needs D % 64 == 0.
inline bool amx_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  const char* e = std::getenv("VITA_CPU_ISA");
  return ok && !(e && std::strcmp(e, "avx512bf16") == 0);
}

// Horizontal max / sum of a 16-lane vector (tree of shuffles).
inline float hmax16(vf x) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  a = a > b ? a : b;
  v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3), d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = c > d ? c : d;
  return std::max(std::max(c[0], c[1]), std::max(c[2], c[3]));
}
inline float hsum16(vf x) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[1]) + (c[2] + c[3]);
}


struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileCfg() {
    for (int i = 0; i < 8; ++i) colsb[i] = 64, rows[i] = 16;
  }
};

// The 2 x 2 tile block of the AMX GEMMs: C tiles 0-3 (rows i, columns j at tile 2i + j) +=
// A (tiles 4-5: 16-row tiles at a and a + 16 rows of lda bytes) x B (tiles 6-7: 16-column pair-word
// tiles at b and b + 16 words, rows of ldb bytes).
template <class TA, class TB>
inline void amx_2x2(const TA* a, int lda, const TB* b, int ldb) {
  _tile_loadd(4, a, lda);
  _tile_loadd(5, reinterpret_cast<const char*>(a) + 16 * lda, lda);
  _tile_loadd(6, b, ldb);
  _tile_loadd(7, b + 16, ldb);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}
// C tiles 0-3 from / to a float32 32 x 32 block at c (row stride ld floats).
inline void amx_load_c(const float* c, int ld) {
  _tile_loadd(0, c, ld * 4);
  _tile_loadd(1, c + 16, ld * 4);
  _tile_loadd(2, c + 16 * ld, ld * 4);
  _tile_loadd(3, c + 16 * ld + 16, ld * 4);
}
inline void amx_store_c(float* c, int ld) {
  _tile_stored(0, c, ld * 4);
  _tile_stored(1, c + 16, ld * 4);
  _tile_stored(2, c + 16 * ld, ld * 4);
  _tile_stored(3, c + 16 * ld + 16, ld * 4);
}

// 2^y on a 16-lane vector for the bf16 path: degree-4 Taylor polynomial on the fraction
// (relative error < 5e-5, far below bf16 rounding of P) and an exact scale by 2^round(y);
// very negative y gives 0, never NaN.
inline __m512 exp2_bf(__m512 y) {
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Keys are taken TKA (256) at a time: every load/store of an O accumulator tile then carries
// 8 tile products, and the per-row softmax bookkeeping (horizontal max/sum, alpha, rescale) is
// paid once per 256 keys. Rows go in pairs of 16-row tiles (2 A x 2 B -> 4 C tiles), and each
// pair runs S = Q K^T, its softmax and O += P V back to back while its S (32 KB) is in L1.
// Softmax is done in the log2 domain (z = s * scale * log2 e) with exp2_bf; P is rounded to bf16
// (vcvtne2ps2bf16), the row sum uses the unrounded values.
template <class KOff, class VOff>
void attend_amx(const bf16_t* kc, const bf16_t* vc, KOff koff, VOff voff, int64_t k_begin, int64_t k_end, int M, int D, float scale,
                Scratch& sc) {
  static_assert(VW == 16, "AMX tiling assumes 16-float vectors");
  static const TileCfg cfg;
  _tile_loadconfig(&cfg);
  const int ldp = round_rows(M);
  const int M32 = (M + 31) / 32 * 32;
  const int Dp = round_cols(D);
  float* O = sc.o.data();
  float* S = sc.s2.data();
  uint16_t* pa = sc.pa.data();
  uint32_t* kbt = sc.kbt.data();
  uint32_t* vv = sc.vv.data();
  const uint16_t* qa = sc.qa.data();
  const uint16_t* zero16 = reinterpret_cast<const uint16_t*>(sc.zero.data());
  const int D2 = D / 2;
  constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
  const __m512 c1 = _mm512_set1_ps(scale * kLog2e);
  for (int r = ldp; r < M32; ++r) {  // the second tile of the last pair: rows that see no key
    std::memset(&sc.qa[size_t(r) * D], 0, sizeof(uint16_t) * D);
    std::fill(O + size_t(r) * Dp, O + size_t(r + 1) * Dp, 0.f);
    sc.limi[r] = 0;
    sc.m[r] = -std::numeric_limits<float>::infinity();
    sc.l[r] = 0.f;
  }
  for (int64_t t0 = k_begin; t0 < k_end; t0 += TKA) {
    const int n = int(std::min<int64_t>(TKA, k_end - t0));
    const int nk = (n + 31) / 32 * 32;  // keys computed (zero K/V rows past n)
    int r0 = 0;
    while (r0 < M && sc.lim[r0] <= t0) ++r0;
    if (r0 == M) break;
    const int rb0 = r0 / 32 * 32;
    // ---- K^T and V as pair words
    const uint32_t* kr[TKA];
    for (int t = 0; t < nk; ++t) {
      if (t < n && t0 + TKA + t < k_end) {
        prefetch_row(kc + koff(t0 + TKA + t), D);
        prefetch_row(vc + voff(t0 + TKA + t), D);
      }
      kr[t] = reinterpret_cast<const uint32_t*>(t < n ? reinterpret_cast<const uint16_t*>(kc + koff(t0 + t)) : zero16);
    }
    for (int tb = 0; tb < nk; tb += 16)
      for (int dp = 0; dp < D2; dp += 16) {
        const uint32_t* src[16];
        for (int i = 0; i < 16; ++i) src[i] = kr[tb + i] + dp;
        transpose16(src, kbt + size_t(dp) * TKA + tb, TKA);
      }
    for (int tp = 0; tp < nk / 2; ++tp) {
      const uint16_t* va = 2 * tp < n ? reinterpret_cast<const uint16_t*>(vc + voff(t0 + 2 * tp)) : zero16;
      const uint16_t* vb = 2 * tp + 1 < n ? reinterpret_cast<const uint16_t*>(vc + voff(t0 + 2 * tp + 1)) : zero16;
      uint32_t* dst = vv + size_t(tp) * D;
      for (int c = 0; c < D; c += VW) {
        const vu lo = __builtin_convertvector(*reinterpret_cast<const vh*>(va + c), vu);
        const vu hi = __builtin_convertvector(*reinterpret_cast<const vh*>(vb + c), vu);
        *reinterpret_cast<vuu*>(dst + c) = lo | (hi << 16);
      }
    }
    for (int rt = rb0; rt < M32; rt += 32) {
      // ---- S[32][nk] = Q K^T (raw dot products)
      for (int j = 0; j < nk; j += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int st = 0; st < D / 32; ++st) {
          const uint32_t* kb = kbt + size_t(st) * 16 * TKA + j;
          amx_2x2(qa + size_t(rt) * D + st * 32, D * 2, kb, TKA * 4);
        }
        amx_store_c(S + j, TKA);
      }
      // ---- online softmax per row (log2 domain); P rows as bf16
      for (int i = 0; i < 32; ++i) {
        const int r = rt + i;
        const int vis = int(std::min<int64_t>(n, int64_t(sc.limi[r]) - t0));  // keys [0, vis) of the tile visible
        uint16_t* pr = pa + size_t(i) * TKA;
        if (vis <= 0) {
          std::memset(pr, 0, sizeof(uint16_t) * nk);
          continue;
        }
        const float* sr = S + size_t(i) * TKA;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int v = 0; v < nk / 16; ++v) {
          const __m512 z = _mm512_mul_ps(_mm512_loadu_ps(sr + v * 16), c1);
          const int left = vis - v * 16;
          const __mmask16 km = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
          mx = _mm512_mask_max_ps(mx, km, mx, z);
        }
        const float m_old = sc.m[r] * kLog2e;  // -inf before the first visible key
        const float m_new = std::max(m_old, _mm512_reduce_max_ps(mx));
        const float alpha = m_old == -std::numeric_limits<float>::infinity() ? 0.f : std::exp2(m_old - m_new);
        const __m512 mv = _mm512_set1_ps(m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int v = 0; v < nk / 16; v += 2) {
          const int left0 = vis - v * 16, left1 = left0 - 16;
          const __mmask16 k0 = left0 >= 16 ? __mmask16(0xffff) : left0 <= 0 ? __mmask16(0) : __mmask16((1u << left0) - 1);
          const __mmask16 k1 = left1 >= 16 ? __mmask16(0xffff) : left1 <= 0 ? __mmask16(0) : __mmask16((1u << left1) - 1);
          const __m512 e0 = _mm512_maskz_mov_ps(k0, exp2_bf(_mm512_fmsub_ps(_mm512_loadu_ps(sr + v * 16), c1, mv)));
          const __m512 e1 = _mm512_maskz_mov_ps(k1, exp2_bf(_mm512_fmsub_ps(_mm512_loadu_ps(sr + v * 16 + 16), c1, mv)));
          sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
          _mm512_storeu_si512(pr + v * 16, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        sc.l[r] = sc.l[r] * alpha + _mm512_reduce_add_ps(sum);
        sc.m[r] = m_new * kLn2;
        if (alpha != 1.0f) {
          float* o = O + size_t(r) * Dp;
          const __m512 av = _mm512_set1_ps(alpha);
          for (int d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
        }
      }
      // ---- O[rt, rt + 32) += P V, 32 channels at a time
      for (int c0 = 0; c0 < D; c0 += 32) {
        float* oc = O + size_t(rt) * Dp + c0;
        amx_load_c(oc, Dp);
        for (int u = 0; u < nk / 32; ++u) amx_2x2(pa + u * 32, TKA * 2, vv + size_t(u) * 16 * D + c0, D * 4);
        amx_store_c(oc, Dp);
      }
    }
  }
  _tile_release();
}
#endif  // VITA_ATTN_BF16DP

// One (sequence, kv head, query block, split) unit of work.
struct Item {
  int32_t b, kvh, j0, j1;
  int64_t k0, k1;
  int64_t part;  // offset into the partials buffer, -1 when the item writes the output directly
  int32_t nh;    // KV heads kvh .. kvh + nh - 1 (more than 1 only for unsplit attend_rows items)
};
// A (sequence, kv head, query block) whose splits must be merged.
struct Merge {
  int32_t b, kvh, j0, j1, nsplit;
  int64_t part;
};

// Shared driver. Seq geometry comes from `seq(b, &q0, &ql, &kl)`; key offsets from
// koff(b, kvh, t) / voff(b, kvh, t); bias (optional) from bias_row(b, hq, &stride).
template <class T, class SeqF, class KOff, class VOff, class BiasF>
void run_attention(const TensorRef& q, const TensorRef& out, const T* kc, const T* vc, int64_t B, int Hkv, float scale,
                   bool causal, int forced_splits, SeqF seq, KOff koff, VOff voff, bool has_bias, BiasF bias_row) {
  const int Hq = int(q.size(1)), D = int(q.size(2));
  if (Hq == 0 || D == 0 || B == 0) return;
  const int g = Hq / Hkv;
  int BQ = std::max(1, kMaxRows / g);
  const int threads = num_threads();
  const int64_t want_items = 4 * int64_t(threads);

  // ---- plan the work items
  auto count_groups = [&](int bq) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; ++b) {
      int64_t q0, ql, kl;
      seq(b, q0, ql, kl);
      n += ceil_div(ql, bq) * Hkv;
    }
    return n;
  };
  int64_t groups = count_groups(BQ);
#if defined(VITA_ATTN_BF16DP)
  // AMX items keep only a 32-row slice of S and O in flight, so more rows per item cost no cache;
  // while the threads have enough items, merge query blocks (up to kMaxRowsAmx rows) so that each
  // K/V tile is fetched, transposed and interleaved once for more rows.
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (!has_bias && D % 64 == 0 && amx_ready() && groups > want_items) {
      const int f = int(std::min<int64_t>(kMaxRowsAmx / kMaxRows, groups / want_items));
      if (f > 1) {
        BQ *= f;
        groups = count_groups(BQ);
      }
    }
  }
#endif
  // Decode-sized groups (attend_rows) of several KV heads share an item while that leaves the
  // threads enough items: the item then reads each token's K/V row once, all heads in order.
  const bool rows_kernel = D % VW == 0;
  const int nh_rows = int(std::clamp<int64_t>(groups / want_items, 1, Hkv));
  std::vector<Item> items;
  int max_rows = 1;  // largest item (sizes the per-thread scratch)
  std::vector<Merge> merges;
  items.reserve(size_t(groups));
  int64_t part = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t q0, ql, kl;
    seq(b, q0, ql, kl);
    if (ql <= 0 || kl <= 0) continue;
    int64_t ns = 1;
    if (forced_splits > 1) {
      ns = forced_splits;
    } else if (groups < want_items && kl >= 2 * kMinSplitKeys) {
      ns = std::min<int64_t>({ceil_div(want_items, groups), kl / kMinSplitKeys, 16});
    }
    const int64_t bq = ceil_div(ql, ceil_div(ql, BQ));  // equal query blocks (same count as BQ)
    for (int64_t j0 = 0; j0 < ql; j0 += bq) {
      const int64_t j1 = std::min<int64_t>(ql, j0 + bq);
      const int64_t kmax = causal ? std::min<int64_t>(kl, kl - ql + j1) : kl;
      if (kmax <= 0) continue;  // only when kv_len < q_len (rejected by the bindings)
      const int64_t chunk = ceil_div(ceil_div(kmax, std::min<int64_t>(ns, ceil_div(kmax, TK))), TK) * TK;
      const int64_t nsplit = ceil_div(kmax, chunk);
      const int64_t rows = (j1 - j0) * g;
      max_rows = std::max(max_rows, int(rows));
      if (nsplit == 1 && rows_kernel && rows <= kDotRows && nh_rows > 1) {
        const int nc = int(ceil_div(Hkv, nh_rows)), nh = int(ceil_div(Hkv, nc));  // nc items of (nearly) equal head counts
        for (int h = 0; h < Hkv; h += nh) {
          const int n = std::min(nh, Hkv - h);
          items.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), 0, kmax, -1, n});
          max_rows = std::max(max_rows, int(rows) * n);
        }
        continue;
      }
      for (int h = 0; h < Hkv; ++h) {
        if (nsplit == 1) {
          items.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), 0, kmax, -1, 1});
        } else {
          merges.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), int32_t(nsplit), part});
          for (int64_t s = 0; s < nsplit; ++s) {
            items.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), s * chunk, std::min(kmax, (s + 1) * chunk), part, 1});
            part += rows * (D + 2);
          }
        }
      }
    }
  }
  std::vector<float> partials(static_cast<size_t>(part));

  const T* Qp = q.ptr<T>();
  T* Op = out.ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  const int maxM = max_rows;
  const int Dp = round_cols(D);

  parallel_for(int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    Scratch sc(maxM, D, std::is_same_v<T, bf16_t> && maxM > 2 * VW);
    std::vector<float> row(D);
    for (int64_t i = ib; i < ie; ++i) {
      const Item& it = items[i];
      int64_t q0, ql, kl;
      seq(it.b, q0, ql, kl);
      const int Mg = (it.j1 - it.j0) * g, M = Mg * it.nh;  // rows per KV head, rows of the item
      bool dp = false, amx = false;  // bf16 query blocks without bias: AMX tiles, else vdpbf16ps
      (void)amx;
#if defined(VITA_ATTN_BF16DP)
      if constexpr (std::is_same_v<T, bf16_t>) {
        dp = Mg > 2 * VW && !has_bias && D % 2 == 0;
        amx = dp && D % 64 == 0 && amx_ready();
      }
#endif
      for (int hi = 0; hi < it.nh; ++hi)
      for (int64_t j = it.j0; j < it.j1; ++j)
        for (int h = 0; h < g; ++h) {
          const int r = hi * Mg + int(j - it.j0) * g + h;
          const int hq = (it.kvh + hi) * g + h;
          const int ldp = round_rows(M);
#if defined(VITA_ATTN_BF16DP)
          if (amx) {
            std::memcpy(&sc.qa[size_t(r) * D], Qp + (q0 + j) * sq0 + hq * sq1, sizeof(uint16_t) * D);
          } else if (dp) {
            const T* qr = Qp + (q0 + j) * sq0 + hq * sq1;
            for (int d2 = 0; d2 < D / 2; ++d2) std::memcpy(&sc.qt2[size_t(d2) * ldp + r], qr + 2 * d2, 4);
          } else
#endif
          {
            load_row(Qp + (q0 + j) * sq0 + hq * sq1, sc.q.data(), D);
            for (int d = 0; d < D; ++d) sc.qt[size_t(d) * ldp + r] = sc.q[d] * scale;
          }
          sc.lim[r] = causal ? kl - ql + j + 1 : kl;
          sc.limi[r] = int32_t(sc.lim[r]);
          if (has_bias) sc.bias[r] = bias_row(it.b, hq, sc.bias_stride[r]);
        }
      if (has_bias) {
        sc.bias_shared = true;
        for (int r = 1; r < M && sc.bias_shared; ++r)
          sc.bias_shared = sc.bias[r] == sc.bias[0] && sc.bias_stride[r] == sc.bias_stride[0];
      }
      // padding lanes: zero queries that see no key (lanes are contiguous within a channel row of
      // Q^T: one short fill per channel, not a strided store per lane and channel)
      if (round_rows(M) > M)
        for (int d = 0; d < D; ++d)
          std::fill(sc.qt.begin() + size_t(d) * round_rows(M) + M, sc.qt.begin() + size_t(d + 1) * round_rows(M), 0.f);
      for (int r = M; r < round_rows(M); ++r) {
#if defined(VITA_ATTN_BF16DP)
        if (dp) for (int d2 = 0; d2 < D / 2; ++d2) sc.qt2[size_t(d2) * round_rows(M) + r] = 0u;
        if (amx) std::memset(&sc.qa[size_t(r) * D], 0, sizeof(uint16_t) * D);
#endif
        sc.limi[r] = 0;
      }
      std::fill(sc.o.begin(), sc.o.begin() + size_t(round_rows(M)) * Dp, 0.f);
      std::fill(sc.m.begin(), sc.m.begin() + round_rows(M), -std::numeric_limits<float>::infinity());
      std::fill(sc.l.begin(), sc.l.begin() + round_rows(M), 0.f);
      const int kvh = it.kvh;
      const int64_t b = it.b;
#if defined(VITA_ATTN_BF16DP)
      if constexpr (std::is_same_v<T, bf16_t>) {
        if (amx)
          attend_amx(kc, vc, [&](int64_t t) { return koff(b, kvh, t); }, [&](int64_t t) { return voff(b, kvh, t); }, it.k0, it.k1, M,
                     D, scale, sc);
        else if (dp)
          attend_dp(kc, vc, [&](int64_t t) { return koff(b, kvh, t); }, [&](int64_t t) { return voff(b, kvh, t); }, it.k0, it.k1, M,
                    D, scale, sc);
      }
#endif
      if (it.nh > 1)
        attend_heads<T>(kc, vc, [&](int hi, int64_t t) { return koff(b, kvh + hi, t); },
                        [&](int hi, int64_t t) { return voff(b, kvh + hi, t); }, it.k0, it.k1, Mg, it.nh, D, has_bias, sc);
      else if (!dp && M <= kDotRows && rows_kernel)
        attend_rows<T>(kc, vc, [&](int64_t t) { return koff(b, kvh, t); }, [&](int64_t t) { return voff(b, kvh, t); }, it.k0, it.k1,
                       M, D, has_bias, sc);
      else if (!dp)
        attend<T>(kc, vc, [&](int64_t t) { return koff(b, kvh, t); }, [&](int64_t t) { return voff(b, kvh, t); }, it.k0, it.k1, M,
                  D, has_bias, sc);
      if (it.part < 0) {
        for (int r = 0; r < M; ++r) {
          const int64_t j = it.j0 + (r % Mg) / g;
          const int hq = (it.kvh + r / Mg) * g + r % g;
          const float inv = sc.l[r] > 0.f ? 1.0f / sc.l[r] : 0.f;
          const float* o = sc.o.data() + size_t(r) * Dp;
#pragma omp simd
          for (int d = 0; d < D; ++d) row[d] = o[d] * inv;
          store_row(row.data(), Op + (q0 + j) * so0 + hq * so1, D);
        }
      } else {
        float* p = partials.data() + it.part;
        for (int r = 0; r < M; ++r, p += D + 2) {
          p[0] = sc.m[r];
          p[1] = sc.l[r];
          std::memcpy(p + 2, sc.o.data() + size_t(r) * Dp, sizeof(float) * D);
        }
      }
    }
  });

  if (merges.empty()) return;
  parallel_for(int64_t(merges.size()), 1, [&](int64_t ib, int64_t ie) {
    std::vector<float> acc(D);
    for (int64_t i = ib; i < ie; ++i) {
      const Merge& mg = merges[i];
      int64_t q0, ql, kl;
      seq(mg.b, q0, ql, kl);
      const int M = (mg.j1 - mg.j0) * g;
      const int64_t split_stride = int64_t(M) * (D + 2);
      for (int r = 0; r < M; ++r) {
        const float* base = partials.data() + mg.part + int64_t(r) * (D + 2);
        float mx = -std::numeric_limits<float>::infinity();
        for (int s = 0; s < mg.nsplit; ++s) mx = std::max(mx, base[s * split_stride]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float L = 0.f;
        if (mx > -std::numeric_limits<float>::infinity()) {
          for (int s = 0; s < mg.nsplit; ++s) {
            const float* p = base + s * split_stride;
            if (p[1] == 0.f) continue;
            const float w = std::exp(p[0] - mx);
            L += w * p[1];
#pragma omp simd
            for (int d = 0; d < D; ++d) acc[d] += w * p[2 + d];
          }
        }
        const float inv = L > 0.f ? 1.0f / L : 0.f;
        for (int d = 0; d < D; ++d) acc[d] *= inv;
        const int64_t j = mg.j0 + r / g;
        const int hq = mg.kvh * g + r % g;
        store_row(acc.data(), Op + (q0 + j) * so0 + hq * so1, D);
      }
    }
  });
}

template <class T>
void paged_impl(const PagedAttentionArgs& a) {
  const int64_t B = a.kv_lens.size(0);
  const int Hkv = int(a.k_cache.size(2));
  const int64_t bs = a.k_cache.size(1);
  const int32_t* bt = a.block_table.ptr<int32_t>();
  const int32_t* kv = a.kv_lens.ptr<int32_t>();
  const int32_t* cu = a.cu_q_lens.ptr<int32_t>();
  const int64_t bt0 = a.block_table.stride(0), bt1 = a.block_table.stride(1);
  const int64_t kvs = a.kv_lens.stride(0), cus = a.cu_q_lens.stride(0);
  const TensorRef &kc = a.k_cache, &vc = a.v_cache;
  auto seq = [&](int64_t b, int64_t& q0, int64_t& ql, int64_t& kl) {
    q0 = cu[b * cus];
    ql = cu[(b + 1) * cus] - q0;
    kl = kv[b * kvs];
  };
  // key -> (page, row): shift and mask for power-of-two block sizes (a 64-bit division per key
  // row costs as much as a fraction of the tile's arithmetic)
  const bool pow2 = bs > 0 && (bs & (bs - 1)) == 0;
  const int sh = pow2 ? __builtin_ctzll(uint64_t(bs)) : 0;
  auto koff = [&, pow2, sh](int64_t b, int kvh, int64_t t) {
    const int64_t pg = pow2 ? t >> sh : t / bs, row = pow2 ? t & (bs - 1) : t % bs;
    const int64_t blk = bt[b * bt0 + pg * bt1];
    return blk * kc.strides[0] + row * kc.strides[1] + kvh * kc.strides[2];
  };
  auto voff = [&, pow2, sh](int64_t b, int kvh, int64_t t) {
    const int64_t pg = pow2 ? t >> sh : t / bs, row = pow2 ? t & (bs - 1) : t % bs;
    const int64_t blk = bt[b * bt0 + pg * bt1];
    return blk * vc.strides[0] + row * vc.strides[1] + kvh * vc.strides[2];
  };
  run_attention<T>(a.q, a.out, kc.ptr<T>(), vc.ptr<T>(), B, Hkv, a.scale, a.causal, a.num_splits, seq, koff, voff, false,
                   [](int64_t, int, int64_t&) -> const float* { return nullptr; });
}

#include "attention_encoder_impl.h"

template <class T>
void varlen_impl(const VarlenAttentionArgs& a) {
  const int64_t B = a.cu_seqlens.size(0) - 1;
  const int Hkv = int(a.k.size(1));
  const int32_t* cu = a.cu_seqlens.ptr<int32_t>();
  const int64_t cus = a.cu_seqlens.stride(0);
  const TensorRef &k = a.k, &v = a.v;
  auto seq = [&](int64_t b, int64_t& q0, int64_t& ql, int64_t& kl) {
    q0 = cu[b * cus];
    ql = kl = cu[(b + 1) * cus] - q0;
  };
  auto koff = [&](int64_t b, int kvh, int64_t t) { return (cu[b * cus] + t) * k.strides[0] + kvh * k.strides[1]; };
  auto voff = [&](int64_t b, int kvh, int64_t t) { return (cu[b * cus] + t) * v.strides[0] + kvh * v.strides[1]; };
  const bool has_bias = a.key_bias.ndim >= 0 && a.key_bias.data != nullptr;
  // key_bias is converted to float32 once ([Hq, T]); rows index it by absolute token.
  std::vector<float> bias;
  if (has_bias) {
    const int64_t Hq = a.key_bias.size(0), T_ = a.key_bias.size(1);
    bias.resize(size_t(Hq * T_));
    dispatch_float(a.key_bias.dtype, "varlen_attention", "key_bias", [&](auto d) {
      using BT = typename CpuType<decltype(d)::value>::type;
      const BT* src = a.key_bias.ptr<BT>();
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t t = 0; t < T_; ++t) bias[h * T_ + t] = to_float(src[h * a.key_bias.stride(0) + t * a.key_bias.stride(1)]);
    });
  }
  const int64_t T_ = has_bias ? a.key_bias.size(1) : 0;
  // Encoder-shaped calls take the blocked tile path (attention_encoder_impl.h); bf16 without bias
  // on AVX512-BF16 CPUs keeps the generic driver's vdpbf16ps / AMX tiles.
  int64_t maxn = 0;
  for (int64_t b = 0; b < B; ++b) maxn = std::max<int64_t>(maxn, cu[(b + 1) * cus] - cu[b * cus]);
  bool tiles = a.q.size(2) % VW == 0 && maxn <= kEncMaxKeys;
#if defined(VITA_ATTN_BF16DP)
  if constexpr (std::is_same_v<T, bf16_t>) tiles = tiles && has_bias;
#endif
  if (tiles) return encoder_attention<T>(a, has_bias ? bias.data() : nullptr, T_);
  auto bias_row = [&](int64_t b, int hq, int64_t& stride) -> const float* {
    stride = 1;
    return bias.data() + hq * T_ + cu[b * cus];
  };
  run_attention<T>(a.q, a.out, k.ptr<T>(), v.ptr<T>(), B, Hkv, a.scale, a.causal, 1, seq, koff, voff, has_bias, bias_row);
}

inline void paged_attention_entry(const PagedAttentionArgs& a) {
  dispatch_float(a.q.dtype, "paged_attention", "q", [&](auto d) { paged_impl<typename CpuType<decltype(d)::value>::type>(a); });
}

inline void varlen_attention_entry(const VarlenAttentionArgs& a) {
  dispatch_float(a.q.dtype, "varlen_attention", "q", [&](auto d) { varlen_impl<typename CpuType<decltype(d)::value>::type>(a); });
}
