// CPU attention over a paged KV cache (decode, chunked prefill, continuation) and over
// contiguous packed sequences (encoder varlen attention).
//
// Algorithm (the same as the GPU's): one work item = (sequence, kv head, block of query tokens
// [, split of the key range]). The item owns every query head of its KV group for a block of query
// tokens (rows = tokens x group heads, <= kMaxRows), so each K/V row is read once per group.
// Keys are streamed in tiles of TK rows (16-bit K/V converted to float32 once per tile). Scores are
// computed transposed, S^T = K.Q^T, by a register-blocked micro-kernel (KB keys x 2 vectors of query
// rows; Q^T is built once per item), so the online softmax (max, sum, unnormalised O per row) runs
// down the keys with vertical vector ops, and O += P.V is register-blocked again (RB rows x 2
// vectors of channels). Causal masks are prefix masks per row (a per-lane key limit), fully masked
// rows give 0, never NaN.
// Long histories with few items are split over the key range; each split writes (m, l, O) partials
// that a second pass merges with log-sum-exp weights.
//
// This file is included by attention.cpp (VITA_ATTN_VW 8: AVX2 / generic) and attention_avx512.cpp
// (VITA_ATTN_VW 16), after <algorithm>, <cmath>, <cstring>, <limits>, <vector>, <immintrin.h>,
// "vec.h", "vita/kernels/attention.h" and "vita/parallel.h", inside a private namespace.
// No include guard on purpose.


constexpr int TK = 64;        // keys per tile
constexpr int kMaxRows = 256; // query rows per work item (query tokens x heads of one KV group)
constexpr int kMinSplitKeys = 512;

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

// Packed V column block (vb[t * 2VW + j], channels [c * 2VW, c * 2VW + 2VW) of the tile, zero past D):
// o[r * ldo + j] += sum_{t < n} p[t * ldp + r] * vb[t * 2VW + j] for R rows.
template <int R>
inline void pv_packed(const float* p, int ldp, const float* vb, int n, float* o, int ldo) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = ldv(o + r * ldo);
    acc[r][1] = ldv(o + r * ldo + VW);
  }
  for (int t = 0; t < n; ++t) {
    const vf v0 = ldv(vb + t * 2 * VW), v1 = ldv(vb + t * 2 * VW + VW);
    const float* pt = p + size_t(t) * ldp;
    for (int r = 0; r < R; ++r) {
      const float pr = pt[r];
      acc[r][0] += pr * v0;
      acc[r][1] += pr * v1;
    }
  }
  for (int r = 0; r < R; ++r) {
    stv(o + r * ldo, acc[r][0]);
    stv(o + r * ldo + VW, acc[r][1]);
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

constexpr int KB = VW == 16 ? 8 : 4;  // keys per S micro-kernel (x 2 row vectors of accumulators)

inline int round_rows(int M) { return (M + VW - 1) / VW * VW; }
// O scratch row stride: D rounded up to the packed V column block (2 * VW channels).
inline int round_cols(int D) { return (D + 2 * VW - 1) / (2 * VW) * (2 * VW); }

struct Scratch {
  std::vector<float> q, qt, o, m, l, alpha, st, kn, vn, vp, zero;
  std::vector<int64_t> lim;
  std::vector<int32_t> limi;
  std::vector<const float*> bias;
  std::vector<int64_t> bias_stride;
  Scratch(int rows, int D)
      : q(size_t(D)), qt(size_t(D) * round_rows(rows)), o(size_t(rows) * round_cols(D)), m(round_rows(rows)), l(round_rows(rows)),
        alpha(round_rows(rows)), st(size_t(TK) * round_rows(rows)), kn(size_t(TK) * D), vn(size_t(TK) * D), vp(size_t(TK) * round_cols(D)), zero(D + 8, 0.f),
        lim(rows), limi(round_rows(rows)), bias(rows), bias_stride(rows) {}
};

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
  const int Dp = round_cols(D), nc = Dp / W;  // O row stride, packed V column blocks
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
      if (pack) {
        load_row(kp, sc.kn.data() + size_t(t) * D, D);
        krow[t] = sc.kn.data() + size_t(t) * D;
        for (int c = 0; c < nc; ++c) {
          float* dst = sc.vp.data() + (size_t(c) * TK + t) * W;
          const int w = std::min(W, D - c * W);
          load_row(vp + c * W, dst, w);
          for (int j = w; j < W; ++j) dst[j] = 0.f;
        }
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
    {  // row-vector pairs outer (their Q^T slice stays in L1), key blocks inner
      int rv = rb0;
      for (; rv + 2 * VW <= ldp; rv += 2 * VW)
        for (int t = 0; t < np; t += KB) qk_block<KB, 2>(sc.qt.data(), ldp, rv, krow + t, D, St + size_t(t) * ldp);
      if (rv < ldp)
        for (int t = 0; t < np; t += KB) qk_block<KB, 1>(sc.qt.data(), ldp, rv, krow + t, D, St + size_t(t) * ldp);
    }
    if (has_bias)
      for (int r = r0; r < M; ++r) {
        const float* b = sc.bias[r];
        const int64_t bst = sc.bias_stride[r];
        for (int t = 0; t < n; ++t) St[size_t(t) * ldp + r] += b[(t0 + t) * bst];
      }
    // ---- online softmax, query rows in lanes (keys >= a row's limit get p = 0)
    for (int rv = rb0; rv < ldp; rv += VW) {
      const vi limv = *reinterpret_cast<const viu*>(sc.limi.data() + rv);
      vf mx = ninf;
      for (int t = 0; t < n; ++t) {
        const vf sv = ldv(St + size_t(t) * ldp + rv);
        const vi tv = vi{} + int32_t(t0 + t);
        const vf sm = tv < limv ? sv : ninf;
        mx = mx > sm ? mx : sm;
      }
      const vf mo = ldv(sc.m.data() + rv);
      const vf mn = mo > mx ? mo : mx;
      const vf mu = mn == ninf ? vf{} : mn;  // lanes with no key yet: any finite offset
      const vf alpha = exp_le0(mo - mu);     // ~0 for fresh lanes (m = -inf), 1 when the max is unchanged
      vf sum = vf{};
      for (int t = 0; t < n; ++t) {
        float* sp = St + size_t(t) * ldp + rv;
        const vi tv = vi{} + int32_t(t0 + t);
        vf e = exp_le0(ldv(sp) - mu);
        e = tv < limv ? e : vf{};
        stv(sp, e);
        sum += e;
      }
      stv(sc.l.data() + rv, ldv(sc.l.data() + rv) * alpha + sum);
      stv(sc.m.data() + rv, mn);
      stv(sc.alpha.data() + rv, alpha);
    }
    for (int r = r0; r < M; ++r) {
      const float a = sc.alpha[r];
      if (a != 1.0f) {
        float* o = O + size_t(r) * Dp;
#pragma omp simd
        for (int d = 0; d < Dp; ++d) o[d] *= a;
      }
    }
    // ---- O += P V
    if (pack) {  // column block outer: its V slice (TK x W floats) stays in L1 for every row group
      for (int c = 0; c < nc; ++c) {
        const float* vb = sc.vp.data() + size_t(c) * TK * W;
        row_groups(r0, M, [&](int r, auto R) {
          pv_packed<decltype(R)::value>(St + r, ldp, vb, n, O + size_t(r) * Dp + c * W, Dp);
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
    const int64_t bq = ceil_div(ql, ceil_div(ql, BQ));  // equal query blocks (same count as BQ)
    for (int64_t j0 = 0; j0 < ql; j0 += bq) {
      const int64_t j1 = std::min<int64_t>(ql, j0 + bq);
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
  const int Dp = round_cols(D);

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
          load_row(Qp + (q0 + j) * sq0 + hq * sq1, sc.q.data(), D);
          const int ldp = round_rows(M);
          for (int d = 0; d < D; ++d) sc.qt[size_t(d) * ldp + r] = sc.q[d] * scale;
          sc.lim[r] = causal ? kl - ql + j + 1 : kl;
          sc.limi[r] = int32_t(sc.lim[r]);
          if (has_bias) sc.bias[r] = bias_row(it.b, hq, sc.bias_stride[r]);
        }
      for (int r = M; r < round_rows(M); ++r) {  // padding lanes: zero queries that see no key
        for (int d = 0; d < D; ++d) sc.qt[size_t(d) * round_rows(M) + r] = 0.f;
        sc.limi[r] = 0;
      }
      std::fill(sc.o.begin(), sc.o.begin() + size_t(M) * Dp, 0.f);
      std::fill(sc.m.begin(), sc.m.begin() + round_rows(M), -std::numeric_limits<float>::infinity());
      std::fill(sc.l.begin(), sc.l.begin() + round_rows(M), 0.f);
      const int kvh = it.kvh;
      const int64_t b = it.b;
      attend<T>(kc, vc, [&](int64_t t) { return koff(b, kvh, t); }, [&](int64_t t) { return voff(b, kvh, t); }, it.k0, it.k1, M,
                D, has_bias, sc);
      if (it.part < 0) {
        for (int r = 0; r < M; ++r) {
          const int64_t j = it.j0 + r / g;
          const int hq = it.kvh * g + r % g;
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
