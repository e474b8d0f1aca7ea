// Paged attention, decode side (flash-decoding), the split-KV merge, the split heuristic and the
// public CUDA entry points of the attention family (paged_attention / varlen_attention dispatch).
//
// The SIMT kernel here is the generic path: decode (q_len <= kDecodeMaxQ), every float32 case,
// and the fallback whenever the tensor-core prefill kernel (attention_prefill.cu) does not apply.
//
// Work decomposition: one block per (sequence x row tile, kv head, split). The rows of a block are
// the (query token, query head) pairs of one GQA group, query-major (row = qi * group + g), R at a
// time, so every K/V row is read once from HBM for all query heads that share it. Keys are streamed
// through shared memory in tiles of N (cp.async, double buffered, 16-byte copies, zero-filled past
// the end of the split), pages resolved through the block table row by row. Per tile:
//   QK   lanes of a warp split one key row into 16-byte chunks (L lanes per key), each lane holds q
//        for its chunk in registers; partial dots are reduced with a transposed butterfly; the
//        scores (log2 domain, masked to -inf) go to shared memory S[N][R].
//   soft NT/R threads per row: tile max, online-softmax rescale factor, p = exp2(s - m).
//   PV   thread = (16-byte chunk of D, key group); acc[R][chunk] in registers, rescaled per tile.
// At the end the key groups are summed through shared memory and the block writes o (one split) or
// the partial (o / l, m, l) to the float32 workspace for the merge kernel.
// Nothing here synchronises with the host or allocates, so the launches are CUDA-graph capturable.
#include <atomic>
#include <cmath>
#include <cstdlib>

#include "attention_common.cuh"

namespace vita::cuda {

// Implemented in attention_prefill.cu (tensor-core FlashAttention-2 kernel, fp16/bf16, D 64/128).
namespace detail {
void prefill_paged(const PagedAttentionArgs& a, int max_q_len, cudaStream_t s);
void prefill_varlen(const VarlenAttentionArgs& a, int max_seqlen, cudaStream_t s);
void decode_paged_mma(const PagedAttentionArgs& a, int max_q_len, int num_splits, cudaStream_t s);
}  // namespace detail

namespace {

constexpr bool kHavePrefill = true;   // tensor-core prefill (attention_prefill.cu) wired in
constexpr int kDecodeMaxQ = 4;  // max_q_len at or below this uses the decode kernel
constexpr int kMaxSplits = 32;
constexpr int kThreads = 128;
constexpr int kRows = 8;  // rows (query token x query head of a GQA group) per block
constexpr float kLog2e = 1.4426950408889634f;

struct SimtParams : AttnLayout {
  float* ws;  // split partials [T, Hq, splits, D + 2]
  int Hq, group, num_splits, row_tiles;
  float scale_log2;
  bool causal, vec16;
};

// 16 bytes of T (16-byte aligned) -> 16 / sizeof(T) floats.
__device__ __forceinline__ void load16(const float* p, float* f) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  f[0] = x.x, f[1] = x.y, f[2] = x.z, f[3] = x.w;
}
__device__ __forceinline__ void load16(const __half* p, float* f) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 t = __half22float2(h);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* f) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Transposed butterfly: C partial sums per lane, reduced over the aligned group of 2*OFF lanes.
// Afterwards a lane holds the full sums of rows [rb, rb + max(1, C / (2*OFF))).
template <int C, int OFF>
struct XReduce {
  static __device__ __forceinline__ void run(float* v, int lane, int& rb) {
    if constexpr (OFF == 0) {
      return;
    } else if constexpr (C > 1) {
      const bool up = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < C / 2; ++i) {
        const float send = up ? v[i] : v[i + C / 2];
        const float keep = up ? v[i + C / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      if (up) rb += C / 2;
      XReduce<C / 2, OFF / 2>::run(v, lane, rb);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
      XReduce<1, OFF / 2>::run(v, lane, rb);
    }
  }
};

template <class T, int D>
struct SimtCfg {
  static constexpr int EPL = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int L = D / EPL;                 // chunks (lanes) per key row
  static constexpr int KPW = 32 / L;                // keys per warp step in QK
  static constexpr int G = kThreads / L;            // key groups in PV
  static constexpr int N = 16384 / (D * int(sizeof(T)));  // keys per tile (16 KB of K)
  static constexpr int R = kRows;
  static constexpr int TPR = kThreads / R;  // softmax threads per row
  static constexpr int CF = R > L ? R / L : 1;
  static constexpr size_t kv_bytes = size_t(2) * 2 * N * D * sizeof(T);  // 2 stages x (K, V)
  static constexpr size_t red_bytes = size_t(G) * R * D * sizeof(float);
  static constexpr size_t smem = kv_bytes + size_t(N) * R * sizeof(float) + 4 * R * sizeof(float);
  static_assert(L <= 32 && 32 % L == 0, "key row must split evenly over a warp");
  static_assert(N % (4 * KPW) == 0 && N % G == 0 && N % TPR == 0 && TPR <= 32, "tile shape");
  static_assert(red_bytes <= kv_bytes, "reduction buffer must fit in the K/V buffers");
  static_assert(R % 4 == 0, "p rows are read as float4");
};

template <class T, int D, bool kPaged, bool kBias>
__global__ void __launch_bounds__(kThreads, 2) attn_simt_kernel(const SimtParams p) {
  using C = SimtCfg<T, D>;
  constexpr int EPL = C::EPL, L = C::L, KPW = C::KPW, G = C::G, N = C::N, R = C::R, TPR = C::TPR, CF = C::CF;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* kv_s = reinterpret_cast<T*>(smem_raw);
  float* S = reinterpret_cast<float*>(smem_raw + C::kv_bytes);  // [N][R]
  float* s_alpha = S + N * R;
  float* s_m = s_alpha + R;
  float* s_l = s_m + R;
  int* s_lim = reinterpret_cast<int*>(s_l + R);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = int(blockIdx.x % unsigned(p.row_tiles));
  const int b = int(blockIdx.x / unsigned(p.row_tiles));
  const int hk = blockIdx.y;
  const int split = blockIdx.z;

  const int q0 = p.cu_q[int64_t(b) * p.scu];
  const int q_len = p.cu_q[int64_t(b + 1) * p.scu] - q0;
  const int kv_len = kPaged ? p.kv_lens[int64_t(b) * p.skv] : q_len;
  const int rows_total = q_len * p.group;
  const int row0 = tile * R;
  if (q_len <= 0 || row0 >= rows_total) return;  // uniform over the block

  int kbeg, kend;  // this split's key range
  split_key_range(kv_len, p.num_splits, split, N, kbeg, kend);
  const int row_last = min(row0 + R, rows_total) - 1;
  if (p.causal) kend = min(kend, kv_len - q_len + row_last / p.group + 1);
  const int ntiles = kend > kbeg ? (kend - kbeg + N - 1) / N : 0;

  if (tid < R) {
    const int rho = row0 + tid;
    int lim = -1;  // masks every key
    if (rho < rows_total) lim = p.causal ? min(kend, kv_len - q_len + rho / p.group + 1) : kend;
    s_lim[tid] = lim;
  }

  // q rows of this block for the lane's chunk (QK mapping), as float.
  const int qc = lane % L, qk = lane / L;
  float qr[R][EPL];
  {
    const T* Q = static_cast<const T*>(p.q);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int rho = row0 + r;
      if (rho < rows_total) {
        const int qi = rho / p.group, g = rho - qi * p.group;
        const T* src = Q + int64_t(q0 + qi) * p.sq_t + int64_t(hk * p.group + g) * p.sq_h + qc * EPL;
#pragma unroll
        for (int e = 0; e < EPL; ++e) qr[r][e] = to_f(src[e]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) qr[r][e] = 0.f;
      }
    }
  }

  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  auto load_tile = [&](int it, int stage) {
    T* ks = kv_s + size_t(stage) * 2 * N * D;
    T* vs = ks + N * D;
    const int t0 = kbeg + it * N;
    for (int i = tid; i < N * L; i += kThreads) {
      const int key = i / L, c = i - key * L;
      const int pos = t0 + key;
      const bool ok = pos < kend;
      const T* ksrc = K;
      const T* vsrc = V;
      if (ok) {
        if constexpr (kPaged) {
          const int page = p.bs_shift >= 0 ? (pos >> p.bs_shift) : pos / p.block_size;
          const int off = pos - page * p.block_size;
          const int64_t blk = p.block_table[int64_t(b) * p.sbt_b + int64_t(page) * p.sbt_i];
          ksrc = K + blk * p.sk_b + off * p.sk_o + hk * p.sk_h + c * EPL;
          vsrc = V + blk * p.sv_b + off * p.sv_o + hk * p.sv_h + c * EPL;
        } else {
          ksrc = K + int64_t(q0 + pos) * p.sk_o + hk * p.sk_h + c * EPL;
          vsrc = V + int64_t(q0 + pos) * p.sv_o + hk * p.sv_h + c * EPL;
        }
      }
      T* kd = ks + key * D + c * EPL;
      T* vd = vs + key * D + c * EPL;
      if (p.vec16) {
        cp_async16(kd, ksrc, ok);
        cp_async16(vd, vsrc, ok);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          kd[e] = ok ? ksrc[e] : from_f<T>(0.f);
          vd[e] = ok ? vsrc[e] : from_f<T>(0.f);
        }
      }
    }
  };

  // Online-softmax state (valid in the softmax threads: row = tid / TPR).
  const int sm_row = tid / TPR, sm_part = tid % TPR;
  float m_run = -INFINITY, l_run = 0.f;
  // PV accumulators: chunk pc of D, key group pg.
  const int pc = tid % L, pg = tid / L;
  float acc[R][EPL];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[r][e] = 0.f;

  const T* bias = static_cast<const T*>(p.bias);
  if (ntiles > 0) {
    load_tile(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < ntiles; ++it) {
    const int st = it & 1;
    if (it + 1 < ntiles) {
      load_tile(it + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ks = kv_s + size_t(st) * 2 * N * D;
    const T* vs = ks + N * D;
    const int t0 = kbeg + it * N;

    // ---- QK: scores of R rows x N keys into S (log2 domain, masked) ----
#pragma unroll 2
    for (int step = 0; step < N / (4 * KPW); ++step) {
      const int key = step * 4 * KPW + warp * KPW + qk;
      float kf[EPL];
      load16(ks + key * D + qc * EPL, kf);
      float part[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) s = fmaf(qr[r][e], kf[e], s);
        part[r] = s;
      }
      int rb = 0;
      XReduce<R, L / 2>::run(part, lane, rb);
      const int pos = t0 + key;
#pragma unroll
      for (int i = 0; i < CF; ++i) {
        const int row = rb + i;
        float s = -INFINITY;
        if (pos < s_lim[row]) {
          s = part[i] * p.scale_log2;
          if constexpr (kBias) {
            const int rho = row0 + row;
            const int hq = hk * p.group + (rho - (rho / p.group) * p.group);
            const int64_t bi = int64_t(hq) * p.sb_h + int64_t(q0 + pos) * p.sb_t;
            s += (p.bias_f32 ? static_cast<const float*>(p.bias)[bi] : to_f(bias[bi])) * kLog2e;
          }
        }
        S[key * R + row] = s;  // lanes holding the same row write the same value
      }
    }
    __syncthreads();

    // ---- online softmax over the tile ----
    {
      float mx = -INFINITY;
#pragma unroll
      for (int k = sm_part; k < N; k += TPR) mx = fmaxf(mx, S[k * R + sm_row]);
#pragma unroll
      for (int o = TPR / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m_run, mx);
      float alpha = 1.f, sum = 0.f;
      if (m_new == -INFINITY) {
#pragma unroll
        for (int k = sm_part; k < N; k += TPR) S[k * R + sm_row] = 0.f;
      } else {
        alpha = exp2f(m_run - m_new);
#pragma unroll
        for (int k = sm_part; k < N; k += TPR) {
          const float e = exp2f(S[k * R + sm_row] - m_new);
          S[k * R + sm_row] = e;
          sum += e;
        }
      }
#pragma unroll
      for (int o = TPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (sm_part == 0) s_alpha[sm_row] = alpha;
    }
    __syncthreads();

    // ---- PV ----
    {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float a = s_alpha[r];
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[r][e] *= a;
      }
#pragma unroll 2
      for (int k = pg; k < N; k += G) {
        float vf[EPL];
        load16(vs + k * D + pc * EPL, vf);
        float pr[R];
#pragma unroll
        for (int r4 = 0; r4 < R; r4 += 4) {
          const float4 x = *reinterpret_cast<const float4*>(S + k * R + r4);
          pr[r4] = x.x, pr[r4 + 1] = x.y, pr[r4 + 2] = x.z, pr[r4 + 3] = x.w;
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc[r][e] = fmaf(pr[r], vf[e], acc[r][e]);
      }
    }
    __syncthreads();  // stage st and S are rewritten next iteration
  }

  // ---- sum the key groups, normalise, write ----
  float* red = reinterpret_cast<float*>(smem_raw);  // [G][R][D], reuses the K/V buffers
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < EPL; ++e) red[(pg * R + r) * D + pc * EPL + e] = acc[r][e];
  if (sm_part == 0) {
    s_m[sm_row] = m_run;
    s_l[sm_row] = l_run;
  }
  __syncthreads();
  T* O = static_cast<T*>(p.out);
  for (int i = tid; i < R * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    const int rho = row0 + r;
    if (rho >= rows_total) continue;
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) sum += red[(g * R + r) * D + d];
    const float l = s_l[r];
    const float o = l > 0.f ? sum / l : 0.f;
    const int qi = rho / p.group, gq = rho - qi * p.group;
    const int64_t tok = q0 + qi;
    const int hq = hk * p.group + gq;
    if (p.num_splits == 1) {
      O[tok * p.so_t + int64_t(hq) * p.so_h + d] = from_f<T>(o);
    } else {
      float* w = p.ws + ((tok * p.Hq + hq) * p.num_splits + split) * int64_t(D + 2);
      w[d] = o;
      if (d == 0) {
        w[D] = s_m[r];
        w[D + 1] = l;
      }
    }
  }
}

// Log-sum-exp merge of the split partials: one thread per output element.
template <class T, int D>
__global__ void __launch_bounds__(128) merge_splits_kernel(const float* ws, T* out, int64_t so_t, int64_t so_h, int64_t total, int Hq,
                                                           int splits) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int d = int(i % D);
  const int64_t th = i / D;  // token * Hq + head
  const int64_t tok = th / Hq;
  const int hq = int(th - tok * Hq);
  const float* w = ws + th * splits * int64_t(D + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    const float* e = w + s * int64_t(D + 2);
    if (e[D + 1] > 0.f) M = fmaxf(M, e[D]);
  }
  float num = 0.f, den = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float* e = w + s * int64_t(D + 2);
      const float l = e[D + 1];
      if (l > 0.f) {
        const float c = l * exp2f(e[D] - M);
        num = fmaf(c, e[d], num);
        den += c;
      }
    }
  }
  out[tok * so_t + int64_t(hq) * so_h + d] = from_f<T>(den > 0.f ? num / den : 0.f);
}

template <class T, int D, bool kPaged, bool kBias>
void launch_simt(const SimtParams& p, int batch, int hkv, cudaStream_t s, const char* op) {
  using C = SimtCfg<T, D>;
  auto* k = attn_simt_kernel<T, D, kPaged, kBias>;
  // Set once per instantiation (and per device the first time it is used there).
  static std::atomic<unsigned> done{0};
  int dev = 0;
  VITA_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 32 && !(done.load() & (1u << dev))) {
    VITA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem)));
    done.fetch_or(1u << dev);
  } else if (dev >= 32) {
    VITA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem)));
  }
  const int64_t gx = int64_t(batch) * p.row_tiles;
  if (gx > 0x7fffffffLL) throw ValueError(std::string(op) + ": too many sequences x query rows for one launch");
  if (hkv > 65535) throw ValueError(std::string(op) + ": too many kv heads");
  dim3 grid(unsigned(gx), unsigned(hkv), unsigned(p.num_splits));
  k<<<grid, kThreads, C::smem, s>>>(p);
  check_launch(op);
}

template <class F>
void dispatch_head_dim(int64_t D, const char* op, F&& f) {
  if (D == 64)
    f(std::integral_constant<int, 64>{});
  else if (D == 128)
    f(std::integral_constant<int, 128>{});
  else
    throw ValueError(std::string(op) + ": head_dim must be 64 or 128 for the CUDA kernels, got " + std::to_string(D));
}

// VITA_ATTN_SIMT_DECODE=1 routes fp16/bf16 decode to the SIMT kernel instead of the tensor-core one
// (a safety valve and an A/B switch for benchmarks; read on every call, so it can be toggled live).
bool simt_decode_forced() {
  const char* e = std::getenv("VITA_ATTN_SIMT_DECODE");
  return e && e[0] && e[0] != '0';
}

// VITA_ATTN_PREFILL_TILE=64 / =16 forces the fp16/bf16 chunked-prefill kernel (64-row tiles, or the
// 16-row split-warp kernel); unset or anything else: chosen by grid size. Returns 64, 16 or 0.
int prefill_kernel_forced() {
  const char* e = std::getenv("VITA_ATTN_PREFILL_TILE");
  if (!e) return 0;
  const int v = std::atoi(e);
  return v == 64 || v == 16 ? v : 0;
}


int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0) VITA_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64) {
    const int c = cache[device].load();
    if (c > 0) return c;
  }
  int n = 0;
  VITA_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (n <= 0) n = 1;
  if (device < 64) cache[device].store(n);
  return n;
}

}  // namespace

int paged_attention_num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_kv_len, int max_q_len, int device) {
  if (max_q_len > kDecodeMaxQ || batch <= 0 || num_kv_heads <= 0 || max_kv_len <= 0) return 1;
  // Blocks resident at once: SMs x blocks per SM of the main decode kernel (tensor-core, bf16/fp16,
  // D = 128: 3 per SM by shared memory). Every split keeps >= 256 keys; at most kMaxSplits.
  const int64_t slots = 3 * int64_t(sm_count(device));
  const int64_t bh = batch * num_kv_heads;
  const int64_t s_max = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, max_kv_len / 256));
  if (bh * s_max <= slots) return int(s_max);  // one partial wave at most: take all the parallelism
  // Otherwise pick the split count with the least wave quantisation (blocks / (waves * slots)),
  // preferring fewer splits when within 2 %: fewer partials to merge, longer streams per block.
  double best_eff = 0.0;
  int64_t best = 1;
  for (int64_t s = 1; s <= s_max; ++s) {
    const int64_t blocks = bh * s;
    const int64_t waves = (blocks + slots - 1) / slots;
    const double eff = double(blocks) / double(waves * slots);
    if (eff > best_eff + 0.02) {
      best_eff = eff;
      best = s;
    }
  }
  return int(best);
}

void paged_attention(const PagedAttentionArgs& a, int64_t stream) {
  const char* op = "paged_attention";
  const int64_t T = a.q.size(0), Hq = a.q.size(1), D = a.q.size(2);
  const int64_t B = a.kv_lens.size(0), Hkv = a.k_cache.size(2);
  if (T == 0 || B == 0 || Hq == 0) return;
  if (Hkv <= 0 || Hq % Hkv != 0)
    throw ValueError(std::string(op) + ": num_q_heads (" + std::to_string(Hq) + ") must be a multiple of num_kv_heads (" +
                     std::to_string(Hkv) + ")");
  if (a.q.dtype != a.k_cache.dtype || a.q.dtype != a.v_cache.dtype || a.q.dtype != a.out.dtype)
    Check{op}.type_error("q, k_cache, v_cache and out must share one dtype");
  if (a.q.stride(-1) != 1 || a.out.stride(-1) != 1 || a.k_cache.stride(-1) != 1 || a.v_cache.stride(-1) != 1)
    Check{op}.value_error("q, out, k_cache and v_cache must have a dense last dimension (stride 1)");
  if (a.block_table.dtype != DType::kInt32 || a.kv_lens.dtype != DType::kInt32 || a.cu_q_lens.dtype != DType::kInt32)
    Check{op}.type_error("block_table, kv_lens and cu_q_lens must be int32 for the CUDA kernels");
  if (a.k_cache.size(1) <= 0) Check{op}.value_error("k_cache block_size must be positive");
  // The host-known bound sizes the grid; T is always a valid one.
  int max_q = a.max_q_len;
  if (max_q <= 0 || max_q > T) max_q = int(std::min<int64_t>(T, 0x7fffffff));
  int splits = std::max(1, a.num_splits);
  if (splits > 1024) Check{op}.value_error("num_splits must be <= 1024, got " + std::to_string(splits));
  if (splits > 1) {
    const int64_t need = paged_attention_workspace_floats(T, Hq, D, splits);
    if (a.workspace.ndim < 0 || a.workspace.dtype != DType::kFloat32 || a.workspace.numel() < need)
      Check{op}.value_error("num_splits = " + std::to_string(splits) + " needs a float32 workspace of " + std::to_string(need) +
                            " elements");
    if (!a.workspace.is_contiguous()) Check{op}.value_error("workspace must be contiguous");
  }
  auto s = as_stream(stream);
  dispatch_head_dim(D, op, [&](auto dtag) {
    constexpr int kD = decltype(dtag)::value;
    dispatch_cuda_float(a.q.dtype, op, "q", [&](auto tag) {
      using T_ = decltype(tag);
      auto merge = [&]() {
        const int64_t total = T * Hq * kD;
        merge_splits_kernel<T_, kD><<<unsigned(ceil_div(total, 128)), 128, 0, s>>>(a.workspace.ptr<float>(), a.out.ptr<T_>(),
                                                                                  a.out.stride(0), a.out.stride(1), total, int(Hq), splits);
        check_launch(op);
      };
      if constexpr (kHavePrefill && !std::is_same_v<T_, float>) {
        if (max_q > kDecodeMaxQ && splits == 1) {
          // 64-row tiles (prefill kernel) unless that leaves most SMs idle (small chunks, small batch):
          // then 16-row tiles with the key tiles split over the warps (the decode kernel, any q_len).
          const int64_t blocks64 = B * Hkv * ceil_div(int64_t(max_q) * (Hq / Hkv), 64);
          const int mode = prefill_kernel_forced();
          if (mode == 16 || (mode != 64 && 2 * blocks64 < sm_count(-1)))
            detail::decode_paged_mma(a, max_q, 1, s);
          else
            detail::prefill_paged(a, max_q, s);
          return;
        }
        if (max_q <= kDecodeMaxQ && !simt_decode_forced()) {
          detail::decode_paged_mma(a, max_q, splits, s);
          if (splits > 1) merge();
          return;
        }
      }
      const int64_t es = sizeof(T_);
      SimtParams p{};
      set_paged_layout(p, a);
      p.ws = splits > 1 ? a.workspace.ptr<float>() : nullptr;
      p.Hq = int(Hq);
      p.group = int(Hq / Hkv);
      p.num_splits = splits;
      p.row_tiles = int(ceil_div(int64_t(max_q) * p.group, kRows));
      p.scale_log2 = a.scale * kLog2e;
      p.causal = a.causal;
      const bool strides16 = (p.sk_b * es) % 16 == 0 && (p.sk_o * es) % 16 == 0 && (p.sk_h * es) % 16 == 0 &&
                             (p.sv_b * es) % 16 == 0 && (p.sv_o * es) % 16 == 0 && (p.sv_h * es) % 16 == 0;
      p.vec16 = strides16 && aligned16(p.k) && aligned16(p.v);
      launch_simt<T_, kD, true, false>(p, int(B), int(Hkv), s, op);
      if (splits > 1) merge();
    });
  });
}

void varlen_attention(const VarlenAttentionArgs& a, int64_t stream) {
  const char* op = "varlen_attention";
  const int64_t T = a.q.size(0), Hq = a.q.size(1), D = a.q.size(2);
  const int64_t B = a.cu_seqlens.size(0) - 1, Hkv = a.k.size(1);
  if (T == 0 || B <= 0 || Hq == 0) return;
  if (Hkv <= 0 || Hq % Hkv != 0)
    throw ValueError(std::string(op) + ": num_q_heads (" + std::to_string(Hq) + ") must be a multiple of num_kv_heads (" +
                     std::to_string(Hkv) + ")");
  const bool has_bias = a.key_bias.ndim >= 0 && a.key_bias.data != nullptr;
  if (a.q.dtype != a.k.dtype || a.q.dtype != a.v.dtype || a.q.dtype != a.out.dtype)
    Check{op}.type_error("q, k, v and out must share one dtype");
  if (has_bias && a.key_bias.dtype != a.q.dtype && a.key_bias.dtype != DType::kFloat32)
    Check{op}.type_error(std::string("key_bias must have the dtype of q or float32, got ") + dtype_name(a.key_bias.dtype));
  if (a.q.stride(-1) != 1 || a.out.stride(-1) != 1 || a.k.stride(-1) != 1 || a.v.stride(-1) != 1)
    Check{op}.value_error("q, k, v and out must have a dense last dimension (stride 1)");
  if (a.cu_seqlens.dtype != DType::kInt32) Check{op}.type_error("cu_seqlens must be int32 for the CUDA kernels");
  int max_len = a.max_seqlen;
  if (max_len <= 0 || max_len > T) max_len = int(std::min<int64_t>(T, 0x7fffffff));
  auto s = as_stream(stream);
  dispatch_head_dim(D, op, [&](auto dtag) {
    constexpr int kD = decltype(dtag)::value;
    dispatch_cuda_float(a.q.dtype, op, "q", [&](auto tag) {
      using T_ = decltype(tag);
      if constexpr (kHavePrefill && !std::is_same_v<T_, float>) {
        detail::prefill_varlen(a, max_len, s);
        return;
      }
      const int64_t es = sizeof(T_);
      SimtParams p{};
      set_varlen_layout(p, a);
      p.ws = nullptr;
      p.Hq = int(Hq);
      p.group = int(Hq / Hkv);
      p.num_splits = 1;
      p.row_tiles = int(ceil_div(int64_t(max_len) * p.group, kRows));
      p.scale_log2 = a.scale * kLog2e;
      p.causal = a.causal;
      const bool strides16 = (p.sk_o * es) % 16 == 0 && (p.sk_h * es) % 16 == 0 && (p.sv_o * es) % 16 == 0 && (p.sv_h * es) % 16 == 0;
      p.vec16 = strides16 && aligned16(p.k) && aligned16(p.v);
      if (has_bias)
        launch_simt<T_, kD, false, true>(p, int(B), int(Hkv), s, op);
      else
        launch_simt<T_, kD, false, false>(p, int(B), int(Hkv), s, op);
    });
  });
}

}  // namespace vita::cuda
