// Tensor-core attention for q_len > kDecodeMaxQ (chunked prefill over the paged cache) and for
// encoder attention over contiguous packed sequences (varlen), fp16/bf16, head_dim 64/128.
//
// FlashAttention-2 structure with hand-written mma.sync.m16n8k16 (fp32 accumulation) + ldmatrix:
//   * a block owns 64 rows of one (sequence, kv head): rows are the (query token, query head) pairs
//     of the GQA group, query-major (row = qi * group + g), so each K/V tile feeds every query head
//     that shares it; 4 warps x 16 rows;
//   * key tiles of 64 rows are gathered through the page table (paged policy: any block size, a tile
//     may span several pages) or read from the packed k/v (contiguous policy) with 16-byte cp.async
//     into XOR-swizzled shared memory, double buffered; rows past the end are zero-filled;
//   * S = Q K^T and O += P V on tensor cores, online softmax in registers (log2 domain), causal
//     bottom-right masking per row, key tiles entirely in the future are not visited;
//   * optional per-key bias [Hq, T] (varlen), added to the scaled score.
// The grid is B * ceil(max_q_len * group / 64) x Hkv; blocks past their sequence's rows exit.
//
// The same TU holds the tensor-core decode kernel (attn_decode_mma_kernel): 16-row tiles, each 64-key
// tile split over the 4 warps, split-KV partials for the merge kernel in attention_decode.cu. It is
// used for fp16/bf16 decode (q_len <= 4) and for chunked prefill whose 64-row grid would leave most
// SMs idle. Keep the mma/ldmatrix code in this TU (compile time).
#include <atomic>

#include "attention_common.cuh"

namespace vita::cuda {
namespace {

constexpr int kBM = 64;  // rows per block
constexpr int kBN = 64;  // keys per tile
constexpr int kPThreads = 128;
constexpr float kLog2eP = 1.4426950408889634f;

struct PrefillParams : AttnLayout {
  int group, row_tiles;
  // decode (split-KV) only
  float* ws;  // partials [T, Hq, splits, D + 2] when num_splits > 1
  int Hq, num_splits;
  float scale_log2;
  bool causal, vec_q, vec_kv, vec_out;
};

__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulation.
template <class T>
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> packed pair of T (first in the low half).
template <class T>
__device__ __forceinline__ unsigned pack2(float x, float y) {
  unsigned u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(x, y);
    memcpy(&u, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    memcpy(&u, &h, 4);
  }
  return u;
}

// Element offset of (row, col) in a [rows][D] tile whose 16-byte chunks are XOR-swizzled by row
// (col a multiple of 8): conflict-free ldmatrix on rows of 128 or 256 bytes.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3);
}

// Q rows [row0, row0 + ROWS) of a block (row = query token x head of the GQA group, query-major)
// into swizzled shared memory; rows at or past rows_total are zero.
template <class T, int D, int ROWS>
__device__ __forceinline__ void load_q_tile(const PrefillParams& p, T* sQ, int row0, int rows_total, int q0, int hk, int tid) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  const T* Q = static_cast<const T*>(p.q);
  for (int i = tid; i < ROWS * CH; i += kPThreads) {
    const int r = i / CH, c = i - r * CH;
    const int rho = row0 + r;
    const bool ok = rho < rows_total;
    const T* src = Q;
    if (ok) {
      const int qi = rho / p.group, gg = rho - qi * p.group;
      src = Q + int64_t(q0 + qi) * p.sq_t + int64_t(hk * p.group + gg) * p.sq_h + c * 8;
    }
    T* dst = sQ + swz<D>(r, c * 8);
    if (p.vec_q) {
      cp_async16(dst, src, ok);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = ok ? src[e] : from_f<T>(0.f);
    }
  }
}

// Keys [t0, t0 + kBN) of kv head hk into the swizzled stage sK / sV, through the page table
// (kPaged) or from the packed sequence starting at token q0; keys at or past kend are zero.
template <class T, int D, bool kPaged>
__device__ __forceinline__ void load_kv_tile(const PrefillParams& p, T* sK, T* sV, int t0, int kend, int b, int q0, int hk,
                                             int tid) {
  constexpr int CH = D / 8;
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  for (int i = tid; i < kBN * CH; i += kPThreads) {
    const int key = i / CH, c = i - key * CH;
    const int pos = t0 + key;
    const bool ok = pos < kend;
    const T* ks = K;
    const T* vs = V;
    if (ok) {
      if constexpr (kPaged) {
        const int page = p.bs_shift >= 0 ? (pos >> p.bs_shift) : pos / p.block_size;
        const int off = pos - page * p.block_size;
        const int64_t blk = p.block_table[int64_t(b) * p.sbt_b + int64_t(page) * p.sbt_i];
        ks = K + blk * p.sk_b + off * p.sk_o + hk * p.sk_h + c * 8;
        vs = V + blk * p.sv_b + off * p.sv_o + hk * p.sv_h + c * 8;
      } else {
        ks = K + int64_t(q0 + pos) * p.sk_o + hk * p.sk_h + c * 8;
        vs = V + int64_t(q0 + pos) * p.sv_o + hk * p.sv_h + c * 8;
      }
    }
    T* kd = sK + swz<D>(key, c * 8);
    T* vd = sV + swz<D>(key, c * 8);
    if (p.vec_kv) {
      cp_async16(kd, ks, ok);
      cp_async16(vd, vs, ok);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        kd[e] = ok ? ks[e] : from_f<T>(0.f);
        vd[e] = ok ? vs[e] : from_f<T>(0.f);
      }
    }
  }
}

template <int D>
struct PrefillCfg {
  static constexpr size_t tile_elems = size_t(kBM) * D;  // kBM == kBN
  static constexpr size_t smem_bytes(size_t elem) { return 5 * tile_elems * elem; }  // Q + 2 x (K, V)
};

template <class T, int D, bool kPaged, bool kBias>
__global__ void __launch_bounds__(kPThreads) attn_prefill_kernel(const PrefillParams p) {
  extern __shared__ __align__(128) unsigned char psmem[];
  T* sQ = reinterpret_cast<T*>(psmem);
  T* sKV = sQ + kBM * D;  // stage s: K at sKV + s * 2 * kBN * D, V right after

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = int(blockIdx.x % unsigned(p.row_tiles));
  const int b = int(blockIdx.x / unsigned(p.row_tiles));
  const int hk = blockIdx.y;

  const int q0 = p.cu_q[int64_t(b) * p.scu];
  const int q_len = p.cu_q[int64_t(b + 1) * p.scu] - q0;
  const int kv_len = kPaged ? p.kv_lens[int64_t(b) * p.skv] : q_len;
  const int rows_total = q_len * p.group;
  const int row0 = tile * kBM;
  if (q_len <= 0 || row0 >= rows_total) return;  // uniform over the block

  const int row_last = min(row0 + kBM, rows_total) - 1;
  int kend = max(kv_len, 0);
  if (p.causal) kend = min(kend, kv_len - q_len + row_last / p.group + 1);
  const int ntiles = kend > 0 ? (kend + kBN - 1) / kBN : 0;

  // This thread's two rows (g and g + 8 of the warp's 16) and their visible-key limits.
  const int g = lane >> 2, t4 = lane & 3;
  int lim[2], hq_row[2];
  int64_t tok_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rho = row0 + warp * 16 + g + 8 * h;
    lim[h] = -1;
    hq_row[h] = 0;
    tok_row[h] = 0;
    if (rho < rows_total) {
      const int qi = rho / p.group;
      lim[h] = p.causal ? min(kend, kv_len - q_len + qi + 1) : kend;
      hq_row[h] = hk * p.group + (rho - qi * p.group);
      tok_row[h] = q0 + qi;
    }
  }

  auto load_q = [&]() { load_q_tile<T, D, kBM>(p, sQ, row0, rows_total, q0, hk, tid); };
  auto load_kv = [&](int it, int st) {
    T* sK = sKV + size_t(st) * 2 * kBN * D;
    load_kv_tile<T, D, kPaged>(p, sK, sK + kBN * D, it * kBN, kend, b, q0, hk, tid);
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  unsigned qf[D / 16][4];
  const T* bias = static_cast<const T*>(p.bias);

  if (ntiles > 0) {
    load_q();
    load_kv(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < ntiles; ++it) {
    const int st = it & 1;
    if (it + 1 < ntiles) {
      load_kv(it + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) ldsm_x4(qf[ks], sQ + swz<D>(warp * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8));
    }
    const T* sK = sKV + size_t(st) * 2 * kBN * D;
    const T* sV = sK + kBN * D;

    // ---- S = Q K^T (16 rows x 64 keys per warp) ----
    float s[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        unsigned bk[4];
        ldsm_x4(bk, sK + swz<D>(np * 16 + (lane >> 4) * 8 + (lane & 7), ks * 16 + ((lane >> 3) & 1) * 8));
        mma16816<T>(s[2 * np], qf[ks], bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], qf[ks], bk[2], bk[3]);
      }
    }

    // ---- online softmax (rows g and g + 8) ----
    const int t0 = it * kBN;
    float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int h = j >> 1;
        const int key = t0 + nt * 8 + 2 * t4 + (j & 1);
        float v = -INFINITY;
        if (key < lim[h]) {
          v = s[nt][j] * p.scale_log2;
          if constexpr (kBias) {
            const int64_t bi = int64_t(hq_row[h]) * p.sb_h + int64_t(q0 + key) * p.sb_t;
            v += (p.bias_f32 ? static_cast<const float*>(p.bias)[bi] : to_f(bias[bi])) * kLog2eP;
          }
        }
        s[nt][j] = v;
        mt[h] = fmaxf(mt[h], v);
      }
    }
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 1));
      mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 2));
      const float m_new = fmaxf(m[h], mt[h]);
      m_use[h] = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[h] - m_use[h]);  // 0 when m[h] == -inf
      m[h] = m_new;
      l[h] *= alpha;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * h] *= alpha;
        o[dn][2 * h + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = exp2f(s[nt][j] - m_use[j >> 1]);
        s[nt][j] = e;
        l[j >> 1] += e;
      }
    }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      unsigned a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned bv[4];
        ldsm_x4_t(bv, sV + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 16 + (lane >> 4) * 8));
        mma16816<T>(o[2 * dp], a, bv[0], bv[1]);
        mma16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // stage st is refilled at iteration it + 1
  }

  // ---- normalise and write ----
  T* O = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lt = l[h];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    if (row0 + warp * 16 + g + 8 * h >= rows_total) continue;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    T* dst = O + tok_row[h] * p.so_t + int64_t(hq_row[h]) * p.so_h + 2 * t4;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const float x = o[dn][2 * h] * inv, y = o[dn][2 * h + 1] * inv;
      if (p.vec_out) {
        *reinterpret_cast<unsigned*>(dst + dn * 8) = pack2<T>(x, y);
      } else {
        dst[dn * 8] = from_f<T>(x);
        dst[dn * 8 + 1] = from_f<T>(y);
      }
    }
  }
}


// ------------------------------------------------------------------------------------------------
// Tensor-core decode (q_len <= kDecodeMaxQ, fp16/bf16): one block per (sequence x 16-row tile,
// kv head, split). The 16 rows are (query token, query head) pairs of the GQA group (padded with
// zero rows); each 64-key tile is split over the 4 warps (16 keys each), every warp keeps its own
// online-softmax state for its keys, and the warps are merged through shared memory at the end.
// With one pass over K/V per (sequence, kv head) this is bandwidth-bound: the tensor cores make the
// per-byte work negligible whatever the group size.
// ------------------------------------------------------------------------------------------------
constexpr int kDM = 16;  // rows per decode block

template <int D>
struct DecodeMmaCfg {
  static constexpr size_t q_elems = size_t(kDM) * D;
  static constexpr size_t kv_elems = size_t(2) * 2 * kBN * D;  // 2 stages x (K, V)
  static constexpr size_t smem_bytes(size_t elem) { return (q_elems + kv_elems) * elem + 2 * 4 * kDM * sizeof(float); }
  static constexpr size_t red_bytes = size_t(4) * kDM * D * sizeof(float);
};

template <class T, int D>
__global__ void __launch_bounds__(kPThreads) attn_decode_mma_kernel(const PrefillParams p) {
  using C = DecodeMmaCfg<D>;
  static_assert(C::red_bytes <= C::kv_elems * sizeof(T), "reduction buffer must fit in the K/V buffers");
  extern __shared__ __align__(128) unsigned char dsmem[];
  T* sQ = reinterpret_cast<T*>(dsmem);
  T* sKV = sQ + C::q_elems;
  float* s_m = reinterpret_cast<float*>(dsmem + (C::q_elems + C::kv_elems) * sizeof(T));  // [4][16]
  float* s_l = s_m + 4 * kDM;                                                             // [4][16]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = int(blockIdx.x % unsigned(p.row_tiles));
  const int b = int(blockIdx.x / unsigned(p.row_tiles));
  const int hk = blockIdx.y;
  const int split = blockIdx.z;

  const int q0 = p.cu_q[int64_t(b) * p.scu];
  const int q_len = p.cu_q[int64_t(b + 1) * p.scu] - q0;
  const int kv_len = p.kv_lens[int64_t(b) * p.skv];
  const int rows_total = q_len * p.group;
  const int row0 = tile * kDM;
  if (q_len <= 0 || row0 >= rows_total) return;  // uniform over the block

  int kbeg, kend;  // this split's key range
  split_key_range(kv_len, p.num_splits, split, kBN, kbeg, kend);
  const int row_last = min(row0 + kDM, rows_total) - 1;
  if (p.causal) kend = min(kend, kv_len - q_len + row_last / p.group + 1);
  const int ntiles = kend > kbeg ? (kend - kbeg + kBN - 1) / kBN : 0;

  const int g = lane >> 2, t4 = lane & 3;
  int lim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rho = row0 + g + 8 * h;
    lim[h] = -1;
    if (rho < rows_total) lim[h] = p.causal ? min(kend, kv_len - q_len + rho / p.group + 1) : kend;
  }

  auto load_q = [&]() { load_q_tile<T, D, kDM>(p, sQ, row0, rows_total, q0, hk, tid); };
  auto load_kv = [&](int it, int st) {
    T* sK = sKV + size_t(st) * 2 * kBN * D;
    load_kv_tile<T, D, true>(p, sK, sK + kBN * D, kbeg + it * kBN, kend, b, q0, hk, tid);
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  unsigned qf[D / 16][4];

  if (ntiles > 0) {
    load_q();
    load_kv(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < ntiles; ++it) {
    const int st = it & 1;
    if (it + 1 < ntiles) {
      load_kv(it + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) ldsm_x4(qf[ks], sQ + swz<D>(lane & 15, ks * 16 + (lane >> 4) * 8));
    }
    const T* sK = sKV + size_t(st) * 2 * kBN * D;
    const T* sV = sK + kBN * D;
    const int kw = warp * 16;  // this warp's 16 keys of the tile

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      unsigned bk[4];
      ldsm_x4(bk, sK + swz<D>(kw + (lane >> 4) * 8 + (lane & 7), ks * 16 + ((lane >> 3) & 1) * 8));
      mma16816<T>(s[0], qf[ks], bk[0], bk[1]);
      mma16816<T>(s[1], qf[ks], bk[2], bk[3]);
    }
    const int t0 = kbeg + it * kBN + kw;
    float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int h = j >> 1;
        const int key = t0 + nt * 8 + 2 * t4 + (j & 1);
        const float v = key < lim[h] ? s[nt][j] * p.scale_log2 : -INFINITY;
        s[nt][j] = v;
        mt[h] = fmaxf(mt[h], v);
      }
    }
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 1));
      mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 2));
      const float m_new = fmaxf(m[h], mt[h]);
      m_use[h] = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[h] - m_use[h]);
      m[h] = m_new;
      l[h] *= alpha;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * h] *= alpha;
        o[dn][2 * h + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = exp2f(s[nt][j] - m_use[j >> 1]);
        s[nt][j] = e;
        l[j >> 1] += e;
      }
    }
    unsigned a[4];
    a[0] = pack2<T>(s[0][0], s[0][1]);
    a[1] = pack2<T>(s[0][2], s[0][3]);
    a[2] = pack2<T>(s[1][0], s[1][1]);
    a[3] = pack2<T>(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      unsigned bv[4];
      ldsm_x4_t(bv, sV + swz<D>(kw + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 16 + (lane >> 4) * 8));
      mma16816<T>(o[2 * dp], a, bv[0], bv[1]);
      mma16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
    }
    __syncthreads();  // stage st is refilled at iteration it + 1
  }

  // ---- merge the 4 warps (each saw a quarter of every tile) ----
  float* red = reinterpret_cast<float*>(sKV);  // [4][16][D], reuses the K/V buffers (all copies done)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lt = l[h];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int r = g + 8 * h;
    if (t4 == 0) {
      s_m[warp * kDM + r] = m[h];
      s_l[warp * kDM + r] = lt;
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      red[(warp * kDM + r) * D + dn * 8 + 2 * t4] = o[dn][2 * h];
      red[(warp * kDM + r) * D + dn * 8 + 2 * t4 + 1] = o[dn][2 * h + 1];
    }
  }
  __syncthreads();
  T* O = static_cast<T*>(p.out);
  for (int i = tid; i < kDM * D; i += kPThreads) {
    const int r = i / D, d = i - r * D;
    const int rho = row0 + r;
    if (rho >= rows_total) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w)
      if (s_l[w * kDM + r] > 0.f) M = fmaxf(M, s_m[w * kDM + r]);
    float num = 0.f, den = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float lw = s_l[w * kDM + r];
        if (lw > 0.f) {
          const float c = exp2f(s_m[w * kDM + r] - M);
          num = fmaf(c, red[(w * kDM + r) * D + d], num);
          den = fmaf(c, lw, den);
        }
      }
    }
    const float out = den > 0.f ? num / den : 0.f;
    const int qi = rho / p.group, gq = rho - qi * p.group;
    const int64_t tok = q0 + qi;
    const int hq = hk * p.group + gq;
    if (p.num_splits == 1) {
      O[tok * p.so_t + int64_t(hq) * p.so_h + d] = from_f<T>(out);
    } else {
      float* w = p.ws + ((tok * p.Hq + hq) * p.num_splits + split) * int64_t(D + 2);
      w[d] = out;
      if (d == 0) {
        w[D] = M;
        w[D + 1] = den;
      }
    }
  }
}

template <class T, int D>
void launch_decode_mma(const PrefillParams& p, int64_t batch, int64_t hkv, cudaStream_t s, const char* op) {
  auto* k = attn_decode_mma_kernel<T, D>;
  const int smem = int(DecodeMmaCfg<D>::smem_bytes(sizeof(T)));
  static std::atomic<unsigned> done{0};
  int dev = 0;
  VITA_CUDA_CHECK(cudaGetDevice(&dev));
  const unsigned bit = dev < 32 ? (1u << dev) : 0u;
  if (!bit || !(done.load() & bit)) {
    VITA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (bit) done.fetch_or(bit);
  }
  const int64_t gx = batch * p.row_tiles;
  if (gx > 0x7fffffffLL) throw ValueError(std::string(op) + ": too many sequences x query rows for one launch");
  if (hkv > 65535) throw ValueError(std::string(op) + ": too many kv heads");
  k<<<dim3(unsigned(gx), unsigned(hkv), unsigned(p.num_splits)), kPThreads, smem, s>>>(p);
  check_launch(op);
}

template <class T, int D, bool kPaged, bool kBias>
void launch_prefill(const PrefillParams& p, int64_t batch, int64_t hkv, cudaStream_t s, const char* op) {
  auto* k = attn_prefill_kernel<T, D, kPaged, kBias>;
  const int smem = int(PrefillCfg<D>::smem_bytes(sizeof(T)));
  static std::atomic<unsigned> done{0};
  int dev = 0;
  VITA_CUDA_CHECK(cudaGetDevice(&dev));
  const unsigned bit = dev < 32 ? (1u << dev) : 0u;
  if (!bit || !(done.load() & bit)) {
    VITA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (bit) done.fetch_or(bit);
  }
  const int64_t gx = batch * p.row_tiles;
  if (gx > 0x7fffffffLL) throw ValueError(std::string(op) + ": too many sequences x query rows for one launch");
  if (hkv > 65535) throw ValueError(std::string(op) + ": too many kv heads");
  k<<<dim3(unsigned(gx), unsigned(hkv), 1), kPThreads, smem, s>>>(p);
  check_launch(op);
}

bool al4(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 == 0; }

template <class F>
void prefill_dispatch(DType dt, int64_t D, const char* op, F&& f) {
  auto with_d = [&](auto tag) {
    if (D == 64)
      f(tag, std::integral_constant<int, 64>{});
    else if (D == 128)
      f(tag, std::integral_constant<int, 128>{});
    else
      throw ValueError(std::string(op) + ": head_dim must be 64 or 128 for the CUDA kernels, got " + std::to_string(D));
  };
  if (dt == DType::kFloat16)
    with_d(__half{});
  else if (dt == DType::kBFloat16)
    with_d(__nv_bfloat16{});
  else
    Check{op}.type_error(std::string("the tensor-core kernel takes float16 or bfloat16, got ") + dtype_name(dt));
}

}  // namespace

namespace detail {

// Tensor-core decode over the paged cache (q_len <= kDecodeMaxQ); writes out (one split) or the
// split partials into a.workspace (the caller merges them).
// Launch parameters of the paged layout shared by the tensor-core decode and prefill kernels;
// rows_per_tile is the kernel's query-row tile (kDM for decode, kBM for prefill).
PrefillParams paged_params(const PagedAttentionArgs& a, int64_t es, int max_q_len, int rows_per_tile) {
  const int64_t Hq = a.q.size(1), Hkv = a.k_cache.size(2);
  PrefillParams p{};
  set_paged_layout(p, a);
  p.group = int(Hq / Hkv);
  p.row_tiles = int(ceil_div(int64_t(max_q_len) * p.group, rows_per_tile));
  p.scale_log2 = a.scale * kLog2eP;
  p.causal = a.causal;
  auto m16 = [&](int64_t st) { return (st * es) % 16 == 0; };
  p.vec_q = aligned16(p.q) && m16(p.sq_t) && m16(p.sq_h);
  p.vec_kv = aligned16(p.k) && aligned16(p.v) && m16(p.sk_b) && m16(p.sk_o) && m16(p.sk_h) && m16(p.sv_b) && m16(p.sv_o) && m16(p.sv_h);
  p.vec_out = al4(p.out) && p.so_t % 2 == 0 && p.so_h % 2 == 0;
  return p;
}

// Tensor-core decode over the paged cache (q_len <= kDecodeMaxQ); writes out (one split) or the
// split partials into a.workspace (the caller merges them).
void decode_paged_mma(const PagedAttentionArgs& a, int max_q_len, int num_splits, cudaStream_t s) {
  const char* op = "paged_attention";
  const int64_t Hq = a.q.size(1), D = a.q.size(2), B = a.kv_lens.size(0), Hkv = a.k_cache.size(2);
  prefill_dispatch(a.q.dtype, D, op, [&](auto tag, auto dtag) {
    using T = decltype(tag);
    constexpr int kD = decltype(dtag)::value;
    PrefillParams p = paged_params(a, sizeof(T), max_q_len, kDM);
    p.ws = num_splits > 1 ? a.workspace.ptr<float>() : nullptr;
    p.Hq = int(Hq);
    p.num_splits = num_splits;
    p.vec_out = false;
    launch_decode_mma<T, kD>(p, B, Hkv, s, op);
  });
}

void prefill_paged(const PagedAttentionArgs& a, int max_q_len, cudaStream_t s) {
  const char* op = "paged_attention";
  const int64_t D = a.q.size(2), B = a.kv_lens.size(0), Hkv = a.k_cache.size(2);
  prefill_dispatch(a.q.dtype, D, op, [&](auto tag, auto dtag) {
    using T = decltype(tag);
    constexpr int kD = decltype(dtag)::value;
    launch_prefill<T, kD, true, false>(paged_params(a, sizeof(T), max_q_len, kBM), B, Hkv, s, op);
  });
}

void prefill_varlen(const VarlenAttentionArgs& a, int max_seqlen, cudaStream_t s) {
  const char* op = "varlen_attention";
  const int64_t Hq = a.q.size(1), D = a.q.size(2), B = a.cu_seqlens.size(0) - 1, Hkv = a.k.size(1);
  const bool has_bias = a.key_bias.ndim >= 0 && a.key_bias.data != nullptr;
  prefill_dispatch(a.q.dtype, D, op, [&](auto tag, auto dtag) {
    using T = decltype(tag);
    constexpr int kD = decltype(dtag)::value;
    const int64_t es = sizeof(T);
    PrefillParams p{};
    set_varlen_layout(p, a);
    p.group = int(Hq / Hkv);
    p.row_tiles = int(ceil_div(int64_t(max_seqlen) * p.group, kBM));
    p.scale_log2 = a.scale * kLog2eP;
    p.causal = a.causal;
    auto m16 = [&](int64_t st) { return (st * es) % 16 == 0; };
    p.vec_q = aligned16(p.q) && m16(p.sq_t) && m16(p.sq_h);
    p.vec_kv = aligned16(p.k) && aligned16(p.v) && m16(p.sk_o) && m16(p.sk_h) && m16(p.sv_o) && m16(p.sv_h);
    p.vec_out = al4(p.out) && p.so_t % 2 == 0 && p.so_h % 2 == 0;
    if (has_bias)
      launch_prefill<T, kD, false, true>(p, B, Hkv, s, op);
    else
      launch_prefill<T, kD, false, false>(p, B, Hkv, s, op);
  });
}

}  // namespace detail
}  // namespace vita::cuda
