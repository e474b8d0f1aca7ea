// CPU attention over a paged KV cache (decode, chunked prefill, continuation) and over
// contiguous packed sequences (encoder varlen attention).
//
// Algorithm (the same as the GPU's): one work item = (sequence, kv head, block of query tokens
// [, split of the key range]). The item owns every query head of its KV group for a block of query
// tokens (rows = tokens x group heads, <= kMaxRows), so each K/V row is read once per group.
// Keys are streamed in tiles of TK rows: the tile is converted to float32 once (K transposed into
// a [D, TK] panel), S = Q.K^T is a register-blocked small GEMM (4 rows x 16 keys), the online
// softmax keeps (max, sum, unnormalised O) per row, and O += P.V is register-blocked again
// (4 rows x 16 channels). Causal masks are prefix masks per row, so masking is a per-row count of
// valid keys in the tile (no -inf arithmetic; fully masked rows give 0, never NaN).
// Long histories with few items are split over the key range; each split writes (m, l, O) partials
// that a second pass merges with log-sum-exp weights.
//
// This file is included by attention.cpp (VITA_ATTN_VW 8: AVX2 / generic) and attention_avx512.cpp
// (VITA_ATTN_VW 16), after <algorithm>, <cmath>, <cstring>, <limits>, <vector>, <immintrin.h>,
// "vec.h", "vita/kernels/attention.h" and "vita/parallel.h", inside a private namespace.
// No include guard on purpose.


constexpr int TK = 64;        // keys per tile
constexpr int kMaxRows = 128; // query rows per work item (query tokens x heads of one KV group)
constexpr int kMinSplitKeys = 512;

// VITA_ATTN_VW floats per vector register (8: AVX2 / generic, 16: AVX-512), set by the includer.
constexpr int VW = VITA_ATTN_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
inline vf ldv(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void stv(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }

typedef int32_t vi __attribute__((vector_size(VW * 4)));

// exp(x) for x <= 0 on a whole vector (relative error ~2e-7); x = -inf gives ~1e-38, callers mask.
inline vf exp_le0(vf x) {
  const vf lo = x - x - 87.0f;
  x = x < lo ? lo : x;
  // round(x / ln2) with the 1.5 * 2^23 trick: the integer lands in the low mantissa bits of t
  const vf t = x * 1.44269504088896341f + 12582912.0f;
  const vf n = t - 12582912.0f;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  vf p = r - r + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const vi e = ((vi)t - 0x4B400000 + 127) << 23;
  return p * (vf)e;
}

// dst[d * ldd + t] = rows[t][d0 + d] for an 8 x 8 block.
inline void transpose8(const float* const* rows, int d0, float* dst, int ldd) {
#if defined(__AVX__)
  __m256 r0 = _mm256_loadu_ps(rows[0] + d0), r1 = _mm256_loadu_ps(rows[1] + d0), r2 = _mm256_loadu_ps(rows[2] + d0),
         r3 = _mm256_loadu_ps(rows[3] + d0), r4 = _mm256_loadu_ps(rows[4] + d0), r5 = _mm256_loadu_ps(rows[5] + d0),
         r6 = _mm256_loadu_ps(rows[6] + d0), r7 = _mm256_loadu_ps(rows[7] + d0);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE), u2 = _mm256_shuffle_ps(t1, t3, 0x44),
         u3 = _mm256_shuffle_ps(t1, t3, 0xEE), u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
         u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
#else
  for (int t = 0; t < 8; ++t)
    for (int d = 0; d < 8; ++d) dst[d * ldd + t] = rows[t][d0 + d];
#endif
}

// s[r * TK + c] = sum_d q[r * D + d] * kt[d * TK + c] for R rows, 2 * VW keys starting at c0.
template <int R>
inline void qk_block(const float* q, int D, const float* kt, int c0, float* s) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int d = 0; d < D; ++d) {
    const vf k0 = ldv(kt + d * TK + c0), k1 = ldv(kt + d * TK + c0 + VW);
    for (int r = 0; r < R; ++r) {
      const float qv = q[r * D + d];
      acc[r][0] += qv * k0;
      acc[r][1] += qv * k1;
    }
  }
  for (int r = 0; r < R; ++r) {
    stv(s + r * TK + c0, acc[r][0]);
    stv(s + r * TK + c0 + VW, acc[r][1]);
  }
}

// o[r * D + dc + j] += sum_{t < n} p[r * TK + t] * vrow[t][dc + j] for R rows, 2 * VW channels.
template <int R>
inline void pv_block(const float* p, const float* const* vrow, int n, int dc, float* o, int D) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = ldv(o + r * D + dc);
    acc[r][1] = ldv(o + r * D + dc + VW);
  }
  for (int t = 0; t < n; ++t) {
    const vf v0 = ldv(vrow[t] + dc), v1 = ldv(vrow[t] + dc + VW);
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * TK + t];
      acc[r][0] += pr * v0;
      acc[r][1] += pr * v1;
    }
  }
  for (int r = 0; r < R; ++r) {
    stv(o + r * D + dc, acc[r][0]);
    stv(o + r * D + dc + VW, acc[r][1]);
  }
}

template <int R>
inline void pv_tail(const float* p, const float* const* vrow, int n, int d0, float* o, int D) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < n; ++t) {
      const float pr = p[r * TK + t];
      for (int d = d0; d < D; ++d) o[r * D + d] += pr * vrow[t][d];
    }
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

// Calls f(r, integral_constant<R>) over rows [r0, M) in blocks of RB (then one smaller block).
template <class F>
inline void row_groups(int r0, int M, F&& f) {
  int r = r0;
  for (; r + RB <= M; r += RB) f(r, std::integral_constant<int, RB>{});
  if (r < M) row_tail<RB - 1>(M - r, r, f);
}

struct Scratch {
  std::vector<float> q, o, m, l, s, kn, kt, vn, zero;
  std::vector<int64_t> lim;
  std::vector<const float*> bias;
  std::vector<int64_t> bias_stride;
  Scratch(int rows, int D) : q(size_t(rows) * D), o(size_t(rows) * D), m(rows), l(rows), s(size_t(rows) * TK),
                             kn(size_t(TK) * D), kt(size_t(D) * TK), vn(size_t(TK) * D), zero(D + 8, 0.f), lim(rows),
                             bias(rows), bias_stride(rows) {}
};

// Streams keys [k_begin, k_end) of one (sequence, kv head) through the M query rows held in sc
// (q pre-scaled, lim = per-row exclusive key limit, sorted non-decreasing). koff/voff map a key
// index to its element offset in kc/vc. Updates sc.o / sc.m / sc.l (online softmax state).
template <class T, class KOff, class VOff>
void attend(const T* kc, const T* vc, KOff koff, VOff voff, int64_t k_begin, int64_t k_end, int M, int D, bool has_bias,
            Scratch& sc) {
  const float* krow[TK];
  const float* vrow[TK];
  float* Q = sc.q.data();
  float* O = sc.o.data();
  float* S = sc.s.data();
  const int DV = D - D % (2 * VW), D8 = D & ~7;
  for (int64_t t0 = k_begin; t0 < k_end; t0 += TK) {
    const int n = int(std::min<int64_t>(TK, k_end - t0));
    int r0 = 0;  // rows [0, r0) see no key of this tile (causal prefix)
    while (r0 < M && sc.lim[r0] <= t0) ++r0;
    if (r0 == M) break;
    // ---- tile -> float32 (K transposed into kt [D, TK], V rows by pointer)
    for (int t = 0; t < n; ++t) {
      const T* kp = kc + koff(t0 + t);
      const T* vp = vc + voff(t0 + t);
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
    for (int t = n; t < TK; ++t) krow[t] = sc.zero.data();
    float* kt = sc.kt.data();
    for (int tb = 0; tb < TK; tb += 8) {
      int d = 0;
      for (; d < D8; d += 8) transpose8(krow + tb, d, kt + size_t(d) * TK + tb, TK);
      for (; d < D; ++d)
        for (int t = 0; t < 8; ++t) kt[size_t(d) * TK + tb + t] = tb + t < n ? krow[tb + t][d] : 0.f;
    }
    // ---- S = Q K^T
    row_groups(r0, M, [&](int r, auto R) {
      for (int c0 = 0; c0 < TK; c0 += 2 * VW) qk_block<decltype(R)::value>(Q + size_t(r) * D, D, kt, c0, S + size_t(r) * TK);
    });
    // ---- online softmax per row (vectorised over the tile's keys; keys >= v are masked to p = 0)
    vi iota;
    for (int i = 0; i < VW; ++i) iota[i] = i;
    for (int r = r0; r < M; ++r) {
      float* s = S + size_t(r) * TK;
      const int v = int(std::min<int64_t>(n, sc.lim[r] - t0));
      if (has_bias) {
        const float* b = sc.bias[r];
        const int64_t bst = sc.bias_stride[r];
        for (int t = 0; t < v; ++t) s[t] += b[(t0 + t) * bst];
      }
      const vf ninf = vf{} - std::numeric_limits<float>::infinity();
      vf sv[TK / VW];
      vf mx = ninf;
      for (int c = 0; c < TK / VW; ++c) {
        sv[c] = ldv(s + c * VW);
        sv[c] = (iota + c * VW) < v ? sv[c] : ninf;
        mx = mx > sv[c] ? mx : sv[c];
      }
      float mt = mx[0];
      for (int i = 1; i < VW; ++i) mt = std::max(mt, mx[i]);
      const float m_old = sc.m[r];
      const float m_new = std::max(m_old, mt);
      vf sum = vf{};
      for (int c = 0; c < TK / VW; ++c) {
        vf e = exp_le0(sv[c] - m_new);
        e = (iota + c * VW) < v ? e : vf{};
        stv(s + c * VW, e);
        sum += e;
      }
      float total = 0.f;
      for (int i = 0; i < VW; ++i) total += sum[i];
      if (m_new > m_old) {
        const float alpha = std::exp(m_old - m_new);  // 0 for the first tile (m_old = -inf)
        sc.l[r] *= alpha;
        float* o = O + size_t(r) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) o[d] *= alpha;
        sc.m[r] = m_new;
      }
      sc.l[r] += total;
    }
    // ---- O += P V
    row_groups(r0, M, [&](int r, auto R) {
      constexpr int RR = decltype(R)::value;
      for (int dc = 0; dc < DV; dc += 2 * VW) pv_block<RR>(S + size_t(r) * TK, vrow, n, dc, O + size_t(r) * D, D);
      if (DV < D) pv_tail<RR>(S + size_t(r) * TK, vrow, n, DV, O + size_t(r) * D, D);
    });
  }
}

// One (sequence, kv head, query block, split) unit of work.
struct Item {
  int32_t b, kvh, j0, j1;
  int64_t k0, k1;
  int64_t part;  // offset into the partials buffer, -1 when the item writes the output directly
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
  const int BQ = std::max(1, kMaxRows / g);
  const int threads = num_threads();

  // ---- plan the work items
  int64_t groups = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t q0, ql, kl;
    seq(b, q0, ql, kl);
    groups += ceil_div(ql, BQ) * Hkv;
  }
  std::vector<Item> items;
  std::vector<Merge> merges;
  items.reserve(size_t(groups));
  int64_t part = 0;
  const int64_t want_items = 4 * int64_t(threads);
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
    for (int64_t j0 = 0; j0 < ql; j0 += BQ) {
      const int64_t j1 = std::min<int64_t>(ql, j0 + BQ);
      const int64_t kmax = causal ? std::min<int64_t>(kl, kl - ql + j1) : kl;
      if (kmax <= 0) continue;  // only when kv_len < q_len (rejected by the bindings)
      const int64_t chunk = ceil_div(ceil_div(kmax, std::min<int64_t>(ns, ceil_div(kmax, TK))), TK) * TK;
      const int64_t nsplit = ceil_div(kmax, chunk);
      const int64_t rows = (j1 - j0) * g;
      for (int h = 0; h < Hkv; ++h) {
        if (nsplit == 1) {
          items.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), 0, kmax, -1});
        } else {
          merges.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), int32_t(nsplit), part});
          for (int64_t s = 0; s < nsplit; ++s) {
            items.push_back({int32_t(b), h, int32_t(j0), int32_t(j1), s * chunk, std::min(kmax, (s + 1) * chunk), part});
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
  const int maxM = BQ * g;

  parallel_for(int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    Scratch sc(maxM, D);
    std::vector<float> row(D);
    for (int64_t i = ib; i < ie; ++i) {
      const Item& it = items[i];
      int64_t q0, ql, kl;
      seq(it.b, q0, ql, kl);
      const int M = (it.j1 - it.j0) * g;
      for (int64_t j = it.j0; j < it.j1; ++j)
        for (int h = 0; h < g; ++h) {
          const int r = int(j - it.j0) * g + h;
          const int hq = it.kvh * g + h;
          float* qr = sc.q.data() + size_t(r) * D;
          load_row(Qp + (q0 + j) * sq0 + hq * sq1, qr, D);
#pragma omp simd
          for (int d = 0; d < D; ++d) qr[d] *= scale;
          sc.lim[r] = causal ? kl - ql + j + 1 : kl;
          if (has_bias) sc.bias[r] = bias_row(it.b, hq, sc.bias_stride[r]);
        }
      std::fill(sc.o.begin(), sc.o.begin() + size_t(M) * D, 0.f);
      std::fill(sc.m.begin(), sc.m.begin() + M, -std::numeric_limits<float>::infinity());
      std::fill(sc.l.begin(), sc.l.begin() + M, 0.f);
      const int kvh = it.kvh;
      const int64_t b = it.b;
      attend<T>(kc, vc, [&](int64_t t) { return koff(b, kvh, t); }, [&](int64_t t) { return voff(b, kvh, t); }, it.k0, it.k1, M,
                D, has_bias, sc);
      if (it.part < 0) {
        for (int r = 0; r < M; ++r) {
          const int64_t j = it.j0 + r / g;
          const int hq = it.kvh * g + r % g;
          const float inv = sc.l[r] > 0.f ? 1.0f / sc.l[r] : 0.f;
          const float* o = sc.o.data() + size_t(r) * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) row[d] = o[d] * inv;
          store_row(row.data(), Op + (q0 + j) * so0 + hq * so1, D);
        }
      } else {
        float* p = partials.data() + it.part;
        for (int r = 0; r < M; ++r, p += D + 2) {
          p[0] = sc.m[r];
          p[1] = sc.l[r];
          std::memcpy(p + 2, sc.o.data() + size_t(r) * D, sizeof(float) * D);
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
  auto koff = [&](int64_t b, int kvh, int64_t t) {
    const int64_t blk = bt[b * bt0 + (t / bs) * bt1];
    return blk * kc.strides[0] + (t % bs) * kc.strides[1] + kvh * kc.strides[2];
  };
  auto voff = [&](int64_t b, int kvh, int64_t t) {
    const int64_t blk = bt[b * bt0 + (t / bs) * bt1];
    return blk * vc.strides[0] + (t % bs) * vc.strides[1] + kvh * vc.strides[2];
  };
  run_attention<T>(a.q, a.out, kc.ptr<T>(), vc.ptr<T>(), B, Hkv, a.scale, a.causal, a.num_splits, seq, koff, voff, false,
                   [](int64_t, int, int64_t&) -> const float* { return nullptr; });
}

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
