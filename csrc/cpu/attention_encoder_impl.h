// Encoder (varlen) attention as blocked tiles: every query of a sequence sees the keys of the same
// sequence (q_len = kv_len), optionally causal, optionally with a per-(head, key) score bias.
//
// Why not the generic driver (attention_impl.h run_attention): its work item streams 64-key tiles
// through all query rows of a KV group with an online softmax, and keeps the scores transposed
// (query rows in lanes). With one query head per KV head and a few hundred tokens (the audio
// encoder: 16/16 heads x 64 over ~250 tokens) an item is 250 rows, so every tile's S^T, Q^T and O
// (64 KB each) leave L1, and each tile pays the online rescale. Here a (sequence, KV head) item
// packs its whole K^T and V once as float32 (the [T, H, D] rows sit at an H*D*4-byte stride, 4 KB
// for the encoder, which maps them onto a few L1 sets), and each block of EQB query rows of one
// head computes its full score rows in one pass: exact softmax, no rescaling.
//  - S = Q.K^T with keys in vector lanes: K^T in blocks of EKB keys (kt[(kb * D + d) * EKB + t]),
//    one block L1-resident while every ER-row group of the query block uses it; Q rows are
//    broadcasts. The key bias is one vector per key vector, shared by the group's rows.
//  - row softmax over the row's keys (causal rows stop at their own position; later keys get 0).
//  - O = P.V with channels in vector lanes, the EKB-key V slice L1-resident across the row groups.
// Included by attention_impl.h (after the helpers it uses: vf, ldv, stv, vi, exp_le0, hsum,
// transpose_vw where VITA_ATTN_TRANSPOSE); no include guard on purpose.

constexpr int EKB = 64;                // keys per K^T / V block
constexpr int EQB = 48;                      // query rows per block (S: EQB x keys floats)
constexpr int ER = 6;                  // query rows per micro-kernel
constexpr int ENV = VW == 16 ? 4 : 2;  // vectors per micro-kernel: AVX-512 6 x 4 = 24 accumulators, AVX2 6 x 2 = 12
// Longer sequences take the online-softmax driver: the packed K/V and the score rows of one block
// (EQB x 4096 floats, 768 KB) still sit in L2 up to here.
constexpr int64_t kEncMaxKeys = 4096;

// f(integral_constant<K>) for the runtime n in [1, N].
template <int N, class F>
inline void enc_const(int n, F&& f) {
  if constexpr (N >= 1) {
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      enc_const<N - 1>(n, f);
  }
}

// s[r * lds + i * VW + l] = sum_d q[r * D + d] * kt[d * EKB + i * VW + l] (+ bias[i * VW + l]) for
// R rows and NV key vectors; lanes at or past a row's key limit (lim0 + r if causal, else lim0,
// relative to the first lane) are stored as -inf. mx[r * VW ...] keeps each row's running max.
template <int R, int NV>
inline void enc_qk(const float* q, int D, const float* kt, float* s, int lds, const float* bias, int lim0, bool causal, float* mx) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = vf{};
  for (int d = 0; d < D; ++d, kt += EKB) {
    vf k[NV];
    for (int i = 0; i < NV; ++i) k[i] = ldv(kt + i * VW);
    for (int r = 0; r < R; ++r) {
      const float qv = q[r * D + d];
      for (int i = 0; i < NV; ++i) acc[r][i] += qv * k[i];
    }
  }
  if (bias) {
    for (int i = 0; i < NV; ++i) {
      const vf b = ldv(bias + i * VW);
      for (int r = 0; r < R; ++r) acc[r][i] += b;
    }
  }
  if (lim0 < NV * VW) {  // some lane of the first row (the one with the lowest limit) is past it
    const vf ninf = vf{} - std::numeric_limits<float>::infinity();
    vi lane;
    for (int l = 0; l < VW; ++l) lane[l] = l;
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NV; ++i) acc[r][i] = (lane + i * VW) < (causal ? lim0 + r : lim0) ? acc[r][i] : ninf;
  }
  for (int r = 0; r < R; ++r) {
    vf m = ldv(mx + r * VW);
    for (int i = 0; i < NV; ++i) {
      stv(s + size_t(r) * lds + i * VW, acc[r][i]);
      m = m > acc[r][i] ? m : acc[r][i];
    }
    stv(mx + r * VW, m);
  }
}

// o[r * D + i * VW + l] (= or +=) sum_{t < n} p[r * lds + t] * v[t * D + i * VW + l] for R rows and
// NV channel vectors.
template <int R, int NV>
inline void enc_pv(const float* p, int lds, const float* v, int D, int n, float* o, bool init) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = init ? vf{} : ldv(o + size_t(r) * D + i * VW);
  for (int t = 0; t < n; ++t, v += D) {
    vf x[NV];
    for (int i = 0; i < NV; ++i) x[i] = ldv(v + i * VW);
    for (int r = 0; r < R; ++r) {
      const float pr = p[size_t(r) * lds + t];
      for (int i = 0; i < NV; ++i) acc[r][i] += pr * x[i];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) stv(o + size_t(r) * D + i * VW, acc[r][i]);
}

// Per-thread buffers, kept between calls (grown, never shrunk) so that a call allocates and
// zero-fills nothing on the hot path: at most ~3 MB per thread at kEncMaxKeys.
struct EncScratch {
  std::vector<float> kt, vp, s, q, o, bias, inv, mx, tmp, row;
  void reserve(int64_t tpad, int D) {
    auto grow = [](std::vector<float>& v, size_t n) {
      if (v.size() < n) v.resize(n);
    };
    grow(kt, size_t(tpad) * D);
    grow(vp, size_t(tpad) * D);
    grow(s, size_t(EQB) * tpad);
    grow(q, size_t(tpad) * D);
    grow(o, size_t(EQB) * D);
    grow(bias, size_t(tpad));
    grow(inv, size_t(EQB));
    grow(mx, size_t(EQB) * VW);
    grow(tmp, size_t(16) * D);
    grow(row, size_t(D));
  }
};

// dst[t * D + d] = src[t * ss + d] * scale as float32 for t < n (Q rows of one head, V rows).
template <class T>
void enc_copy_rows(const T* src, int64_t ss, int n, int D, float scale, float* dst) {
  for (int t = 0; t < n; ++t) {
    float* row = dst + size_t(t) * D;
    load_row(src + t * ss, row, D);
    if (scale != 1.0f)
      for (int d = 0; d < D; ++d) row[d] *= scale;
  }
}

// kt / vp from keys [0, n) of one KV head (rows k + t * ks, v + t * vs); K^T zero past n up to
// the next multiple of EKB (those lanes are computed, then excluded by the softmax).
template <class T>
void enc_pack(const T* k, int64_t ks, const T* v, int64_t vs, int n, int D, EncScratch& sc) {
  const int tpad = (n + EKB - 1) / EKB * EKB;
  float* kt = sc.kt.data();
  enc_copy_rows(v, vs, n, D, 1.0f, sc.vp.data());
#if defined(VITA_ATTN_TRANSPOSE)
  if (D % VW == 0) {  // VW keys at a time through a VW x VW register transpose
    float* tmp = sc.tmp.data();
    for (int t0 = 0; t0 < tpad; t0 += VW) {
      const uint32_t* src[VW];
      for (int i = 0; i < VW; ++i) {
        float* row = tmp + size_t(i) * D;
        if (t0 + i < n)
          load_row(k + (t0 + i) * ks, row, D);
        else
          std::fill(row, row + D, 0.f);
      }
      float* dst = kt + size_t(t0 / EKB) * D * EKB + t0 % EKB;
      for (int d = 0; d < D; d += VW) {
        for (int i = 0; i < VW; ++i) src[i] = reinterpret_cast<const uint32_t*>(tmp + size_t(i) * D + d);
        transpose_vw(src, reinterpret_cast<uint32_t*>(dst + size_t(d) * EKB), EKB);
      }
    }
    return;
  }
#endif
  float* row = sc.row.data();
  for (int t = 0; t < tpad; ++t) {
    if (t < n)
      load_row(k + t * ks, row, D);
    else
      std::fill(row, row + D, 0.f);
    float* dst = kt + size_t(t / EKB) * D * EKB + t % EKB;
    for (int d = 0; d < D; ++d) dst[size_t(d) * EKB] = row[d];
  }
}

// One block of nr query rows (tokens j0 .. j0 + nr - 1 of a sequence of n tokens, one query head)
// against the packed K/V in sc: Q holds the scaled queries (row-major, nr x D), bias the head's
// key bias over the sequence (zero past n) or nullptr. Leaves the unnormalised O in sc.o and
// 1 / row sum in sc.inv.
inline void enc_block(int j0, int nr, int n, int D, bool causal, const float* bias, const float* Q, EncScratch& sc) {
  const int kend = causal ? std::min(n, j0 + nr) : n;  // keys any row of the block sees
  const int nkb = (kend + EKB - 1) / EKB;
  const int lds = nkb * EKB;
  float* S = sc.s.data();
  float* O = sc.o.data();
  const int nvd = D / VW;
  // ---- S = Q K^T (+ bias); keys past a row's limit are -inf, and each row's max is kept
  const vf ninf = vf{} - std::numeric_limits<float>::infinity();
  float* MX = sc.mx.data();
  for (int r = 0; r < nr; ++r) stv(MX + r * VW, ninf);
  for (int kb = 0; kb < nkb; ++kb) {
    const int kb0 = kb * EKB, nvk = (std::min(EKB, kend - kb0) + VW - 1) / VW;
    const float* ktb = sc.kt.data() + size_t(kb) * D * EKB;
    for (int r = 0; r < nr; r += ER) {
      const int R = std::min(ER, nr - r);
      if (causal && j0 + r + R <= kb0) continue;  // no row of the group sees a key of this block
      const int lim = causal ? std::min(n, j0 + r + 1) : n;  // the group's first row's key limit
      enc_const<ER>(R, [&](auto RC) {
        for (int c = 0; c < nvk; c += ENV)
          enc_const<ENV>(std::min(ENV, nvk - c), [&](auto NC) {
            const int c0 = kb0 + c * VW;
            enc_qk<decltype(RC)::value, decltype(NC)::value>(Q + size_t(r) * D, D, ktb + c * VW, S + size_t(r) * lds + c0, lds,
                                                             bias ? bias + c0 : nullptr, lim - c0, causal && lim < n, MX + r * VW);
          });
      });
    }
  }
  // ---- row softmax over the row's keys; later keys up to kend get p = 0 (P.V reads them)
  vi lane;
  for (int i = 0; i < VW; ++i) lane[i] = i;
  for (int r = 0; r < nr; ++r) {
    float* s = S + size_t(r) * lds;
    const int lim = causal ? std::min(n, j0 + r + 1) : n;
    const vf mv = ldv(MX + r * VW);
    float mx = mv[0];
    for (int i = 1; i < VW; ++i) mx = std::max(mx, mv[i]);
    if (mx == -std::numeric_limits<float>::infinity()) {  // every score -inf (a -inf bias): no key, output 0
      for (int t = 0; t < kend; t += VW) stv(s + t, vf{});
      sc.inv[r] = 0.f;
      continue;
    }
    const vf mu = vf{} + mx;
    vf sum = vf{};
    int t = 0;
    for (; t + VW <= lim; t += VW) {
      const vf e = exp_le0(ldv(s + t) - mu);
      stv(s + t, e);
      sum += e;
    }
    if (t < lim) {  // the vector holding the row's last keys: lanes past the limit exactly 0
      vf e = exp_le0(ldv(s + t) - mu);
      e = (lane + t) < lim ? e : vf{};
      stv(s + t, e);
      sum += e;
      t += VW;
    }
    for (; t < kend; t += VW) stv(s + t, vf{});
    const float l = hsum(sum);
    sc.inv[r] = l > 0.f ? 1.0f / l : 0.f;
  }
  // ---- O = P V
  for (int kb = 0; kb < nkb; ++kb) {
    const int kb0 = kb * EKB, nk = std::min(EKB, kend - kb0);
    const float* vb = sc.vp.data() + size_t(kb0) * D;
    for (int r = 0; r < nr; r += ER) {
      const int R = std::min(ER, nr - r);
      const int nt = causal ? std::min(nk, j0 + r + R - kb0) : nk;  // keys of the block the group's last row sees
      if (nt <= 0) continue;  // (as in S; kb == 0 always has nt >= 1, so every row's O is initialised)
      enc_const<ER>(R, [&](auto RC) {
        for (int c = 0; c < nvd; c += ENV)
          enc_const<ENV>(std::min(ENV, nvd - c), [&](auto NC) {
            enc_pv<decltype(RC)::value, decltype(NC)::value>(S + size_t(r) * lds + kb0, lds, vb + c * VW, D, nt, O + size_t(r) * D + c * VW,
                                                             kb == 0);
          });
      });
    }
  }
}

// Varlen attention through enc_block (D a multiple of VW, every sequence <= kEncMaxKeys tokens).
// Work items: (sequence, KV head, range of query blocks); an item packs its head's K/V once and
// runs every query head of the group over its blocks. Sequences are split into several items only
// when there are too few (sequence, KV head) pairs to keep the threads busy.
template <class T>
void encoder_attention(const VarlenAttentionArgs& a, const float* bias_all, int64_t bias_ld) {
  const int64_t B = a.cu_seqlens.size(0) - 1;
  const int Hq = int(a.q.size(1)), Hkv = int(a.k.size(1)), D = int(a.q.size(2));
  if (B <= 0 || Hq == 0 || D == 0) return;
  const int g = Hq / Hkv;
  const int32_t* cu = a.cu_seqlens.ptr<int32_t>();
  const int64_t cus = a.cu_seqlens.stride(0);
  struct EncItem {
    int32_t b, kvh, blk0, blk1;  // query blocks [blk0, blk1) of bq rows
    int32_t bq;
  };
  int64_t pairs = 0, maxn = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[(b + 1) * cus] - cu[b * cus];
    if (n > 0) pairs += Hkv;
    maxn = std::max(maxn, n);
  }
  if (pairs == 0) return;
  const int64_t want = 4 * int64_t(num_threads());
  const int64_t per_pair = std::max<int64_t>(1, ceil_div(want, pairs));
  std::vector<EncItem> items;
  for (int64_t b = 0; b < B; ++b) {
    const int n = cu[(b + 1) * cus] - cu[b * cus];
    if (n <= 0) continue;
    const int nblk = int(ceil_div(n, EQB)), bq = int(ceil_div(n, nblk));  // equal blocks of <= EQB rows
    const int nitem = int(std::min<int64_t>(per_pair, nblk)), per = int(ceil_div(nblk, nitem));
    for (int h = 0; h < Hkv; ++h)
      for (int b0 = 0; b0 < nblk; b0 += per) items.push_back({int32_t(b), h, b0, std::min(nblk, b0 + per), bq});
  }
  const T* Qp = a.q.ptr<T>();
  const T* Kp = a.k.ptr<T>();
  const T* Vp = a.v.ptr<T>();
  T* Op = a.out.ptr<T>();
  const int64_t sq0 = a.q.stride(0), sq1 = a.q.stride(1), sk0 = a.k.stride(0), sk1 = a.k.stride(1);
  const int64_t sv0 = a.v.stride(0), sv1 = a.v.stride(1), so0 = a.out.stride(0), so1 = a.out.stride(1);
  const float scale = a.scale;
  const bool causal = a.causal;
  const int64_t tpad_max = ceil_div(maxn, EKB) * EKB;
  parallel_for(int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    thread_local EncScratch sc;
    sc.reserve(tpad_max, D);
    for (int64_t i = ib; i < ie; ++i) {
      const EncItem& it = items[size_t(i)];
      const int64_t s0 = cu[it.b * cus];
      const int n = int(cu[(it.b + 1) * cus] - s0);
      enc_pack(Kp + s0 * sk0 + it.kvh * sk1, sk0, Vp + s0 * sv0 + it.kvh * sv1, sv0, n, D, sc);
      const int tpad = int(ceil_div(n, EKB) * EKB);
      for (int h = 0; h < g; ++h) {
        const int hq = it.kvh * g + h;
        const float* bias = nullptr;
        if (bias_all) {  // this head's bias over the sequence, zero-padded to whole key blocks
          const float* src = bias_all + hq * bias_ld + s0;
          std::copy(src, src + n, sc.bias.data());
          std::fill(sc.bias.data() + n, sc.bias.data() + tpad, 0.f);
          bias = sc.bias.data();
        }
        const int r0 = it.blk0 * it.bq, r1 = std::min(n, it.blk1 * it.bq);  // this item's query rows
        if (r0 >= r1) continue;
        enc_copy_rows(Qp + (s0 + r0) * sq0 + hq * sq1, sq0, r1 - r0, D, scale, sc.q.data());
        for (int blk = it.blk0; blk < it.blk1; ++blk) {
          const int j0 = blk * it.bq, nr = std::min(it.bq, n - j0);
          if (nr <= 0) break;
          enc_block(j0, nr, n, D, causal, bias, sc.q.data() + size_t(j0 - r0) * D, sc);
          float* row = sc.row.data();
          for (int r = 0; r < nr; ++r) {
            const float inv = sc.inv[r];
            const float* o = sc.o.data() + size_t(r) * D;
            for (int d = 0; d < D; ++d) row[d] = o[d] * inv;
            store_row(row, Op + (s0 + j0 + r) * so0 + hq * so1, D);
          }
        }
      }
    }
  });
}
