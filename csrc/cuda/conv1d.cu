// CUDA codec kernels: fused conv1d and polyphase conv_transpose1d.
//
// Both ops are lowered to one "generalised 1-D correlation" problem (Conv1dProblem):
//   out[b, o, q*ostride + o_off] = epi( sum_{i < Cin, m < taps} w[o*wso + i*wsi + m*wsk] * act(x[b, i, q + m*dil + x_off]) )
// for q in [q_lo, q_lo + nq); x outside [0, Tin) reads as zero. conv1d is ostride 1; each phase r of a
// transposed conv is ostride = stride with reversed taps (wsk = -stride).
//
// Two kernels:
//  * conv_mma: fp16/bf16 implicit GEMM on tensor cores (mma.sync m16n8k16, fp32 accumulation).
//    M = output channels (64 per block), N = time (64 per block), K = (input channel, tap): per
//    16-channel slice the activated input window [16 ch x (64 + span)] and the weights [taps x 64 x 16]
//    are staged in shared memory; every tap is then 2x4 mma per warp (4 warps, 32x32 each).
//  * conv_simt: any dtype (the fp32 path and narrow layers): 32 channels x 128 steps per block,
//    4x4 outputs per thread from shared-memory tiles, fp32 math.
// No host synchronisation and no allocation in the launch path.
#include <cstdint>

#include "common.cuh"
#include "vita/kernels/codec.h"

namespace vita::cuda {
namespace {

template <class T>
struct Conv1dProblem {
  const T* x;
  int64_t xsb, xsc, Tin;
  int Cin;
  const T* w;  // points at tap m = 0 of (o = 0, i = 0)
  int64_t wso, wsi, wsk;
  int taps, dil;
  int64_t x_off;
  const T* bias;
  int Cout;
  T* out;
  int64_t osb, osc, ostride, o_off;
  int64_t q_lo, nq;
  const T* res;
  int64_t rsb, rsc;
  const T* acc;
  int64_t asb, asc;
  float alpha, beta, slope;
  bool lrelu, tanh_out;
  int ict;  // SIMT: input channels per shared-memory slice
};

template <class T>
__device__ __forceinline__ void epilogue(const Conv1dProblem<T>& p, int64_t b, int o, int64_t q, float v) {
  if (o >= p.Cout || q >= p.q_lo + p.nq) return;
  if (p.bias) v += to_f(p.bias[o]);
  // residual / accum exist only for conv1d (ostride 1, o_off 0): same time index as out.
  if (p.res) v += to_f(p.res[b * p.rsb + o * p.rsc + q]);
  v *= p.alpha;
  if (p.acc) v += p.beta * to_f(p.acc[b * p.asb + o * p.asc + q]);
  if (p.tanh_out) v = tanhf(v);
  p.out[b * p.osb + o * p.osc + q * p.ostride + p.o_off] = from_f<T>(v);
}

template <class T>
__device__ __forceinline__ float load_act(const Conv1dProblem<T>& p, int64_t b, int c, int64_t t) {
  if (c >= p.Cin || t < 0 || t >= p.Tin) return 0.f;
  float v = to_f(p.x[b * p.xsb + c * p.xsc + t]);
  if (p.lrelu) v = v >= 0.f ? v : v * p.slope;
  return v;
}

// ---- SIMT kernel --------------------------------------------------------------------------------
constexpr int kSimtOC = 32, kSimtT = 128, kSimtThreads = 256;

template <class T>
__global__ void __launch_bounds__(kSimtThreads) conv_simt(const Conv1dProblem<T> p) {
  extern __shared__ float smem[];
  const int span = p.taps > 0 ? (p.taps - 1) * p.dil : 0;
  const int XW = kSimtT + span;
  const int ICT = p.ict;
  float* sx = smem;                // [ICT][XW]
  float* sw = smem + ICT * XW;     // [kSimtOC][ICT][taps]
  const int64_t b = blockIdx.z;
  const int oc0 = blockIdx.y * kSimtOC;
  const int64_t q0 = p.q_lo + int64_t(blockIdx.x) * kSimtT;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;  // warp -> 4 channels, lane -> 4 steps (stride 32)
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int ic0 = 0; ic0 < p.Cin; ic0 += ICT) {
    __syncthreads();
    for (int idx = tid; idx < ICT * XW; idx += kSimtThreads) {
      const int c = idx / XW, j = idx - c * XW;
      sx[idx] = load_act(p, b, ic0 + c, q0 + p.x_off + j);
    }
    const int wn = ICT * p.taps;
    for (int idx = tid; idx < kSimtOC * wn; idx += kSimtThreads) {
      const int o = idx / wn, rem = idx - o * wn, c = rem / p.taps, m = rem - c * p.taps;
      float v = 0.f;
      if (oc0 + o < p.Cout && ic0 + c < p.Cin) v = to_f(p.w[int64_t(oc0 + o) * p.wso + int64_t(ic0 + c) * p.wsi + int64_t(m) * p.wsk]);
      sw[idx] = v;
    }
    __syncthreads();
    const int nic = min(ICT, p.Cin - ic0);
    for (int c = 0; c < nic; ++c) {
      const float* xr = sx + c * XW + lane;
      for (int m = 0; m < p.taps; ++m) {
        float xv[4], wv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[j] = xr[m * p.dil + 32 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) wv[i] = sw[((wid * 4 + i) * ICT + c) * p.taps + m];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(wv[i], xv[j], acc[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) epilogue(p, b, oc0 + wid * 4 + i, q0 + lane + 32 * j, acc[i][j]);
}

// ---- tensor-core kernel -----------------------------------------------------------------------------
constexpr int kMmaBM = 64, kMmaBN = 64, kMmaBK = 16, kMmaLD = 24, kMmaThreads = 128;
constexpr int kMmaMaxTaps = 13, kMmaMaxSpan = 160;

template <class T>
__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host routes here only for sm_80+
#endif
}

template <class T>
__global__ void __launch_bounds__(kMmaThreads) conv_mma(const Conv1dProblem<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int span = p.taps > 0 ? (p.taps - 1) * p.dil : 0;
  const int XW = kMmaBN + span;
  T* sw = reinterpret_cast<T*>(smem_raw);       // [taps][BM][LD]  (A: row = out channel, col = input channel)
  T* sx = sw + p.taps * kMmaBM * kMmaLD;        // [XW][LD]        (B: x window transposed, time-major)
  const int64_t b = blockIdx.z;
  const int oc0 = blockIdx.y * kMmaBM;
  const int64_t q0 = p.q_lo + int64_t(blockIdx.x) * kMmaBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;      // warp tile: rows wm*32.., cols wn*32..
  const int g = lane >> 2, tg = lane & 3;
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  for (int ic0 = 0; ic0 < p.Cin; ic0 += kMmaBK) {
    __syncthreads();
    for (int idx = tid; idx < kMmaBK * XW; idx += kMmaThreads) {  // coalesced along time
      const int c = idx / XW, j = idx - c * XW;
      sx[j * kMmaLD + c] = from_f<T>(load_act(p, b, ic0 + c, q0 + p.x_off + j));
    }
    const int wn_ = kMmaBK * p.taps;
    for (int idx = tid; idx < kMmaBM * wn_; idx += kMmaThreads) {  // taps fastest: contiguous in torch conv1d layout
      const int o = idx / wn_, rem = idx - o * wn_, c = rem / p.taps, m = rem - c * p.taps;
      float v = 0.f;
      if (oc0 + o < p.Cout && ic0 + c < p.Cin) v = to_f(p.w[int64_t(oc0 + o) * p.wso + int64_t(ic0 + c) * p.wsi + int64_t(m) * p.wsk]);
      sw[(m * kMmaBM + o) * kMmaLD + c] = from_f<T>(v);
    }
    __syncthreads();
    for (int m = 0; m < p.taps; ++m) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const T* base = sw + (m * kMmaBM + wm * 32 + mt * 16 + g) * kMmaLD + 2 * tg;
        af[mt][0] = *reinterpret_cast<const uint32_t*>(base);
        af[mt][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kMmaLD);
        af[mt][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        af[mt][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kMmaLD + 8);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const T* bb = sx + (wn * 32 + nt * 8 + g + m * p.dil) * kMmaLD + 2 * tg;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(bb);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(bb + 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma16816<T>(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], b0, b1);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = wm * 32 + mt * 16 + g + (e >= 2 ? 8 : 0);
        const int col = wn * 32 + nt * 8 + 2 * tg + (e & 1);
        epilogue(p, b, oc0 + row, q0 + col, acc[mt][nt][e]);
      }
}

template <class T>
void launch_mma(const Conv1dProblem<T>& p, int64_t B, int span, cudaStream_t st) {
  const size_t smem = (size_t(p.taps) * kMmaBM * kMmaLD + size_t(kMmaBN + span) * kMmaLD) * sizeof(T);
  if (smem > 48 * 1024) VITA_CUDA_CHECK(cudaFuncSetAttribute(conv_mma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid(unsigned((p.nq + kMmaBN - 1) / kMmaBN), unsigned((p.Cout + kMmaBM - 1) / kMmaBM), unsigned(B));
  conv_mma<T><<<grid, kMmaThreads, smem, st>>>(p);
}

int device_sm() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  return major;
}

template <class T>
void launch(const char* op, Conv1dProblem<T> p, int64_t B, cudaStream_t st) {
  if (p.nq <= 0 || B <= 0 || p.Cout <= 0) return;
  if (B > 65535) throw ValueError(std::string(op) + ": batch " + std::to_string(B) + " exceeds the CUDA grid limit 65535");
  const int span = p.taps > 0 ? (p.taps - 1) * p.dil : 0;
  constexpr bool k16 = !std::is_same_v<T, float>;
  static const int sm_major = device_sm();  // one device family per process is assumed
  [[maybe_unused]] const bool use_mma = k16 && sm_major >= 8 && p.Cout >= 16 && p.Cin >= 16 && p.taps >= 1 && p.taps <= kMmaMaxTaps &&
                       span <= kMmaMaxSpan;
  if constexpr (k16) {
    if (use_mma) {
      launch_mma<T>(p, B, span, st);
      check_launch(op);
      return;
    }
  }
  const int64_t XW = kSimtT + span;
  const int64_t budget = 44 * 1024 / sizeof(float);
  const int64_t per_ic = XW + int64_t(kSimtOC) * p.taps;
  int64_t ict = std::min<int64_t>(16, std::max(1, p.Cin));
  while (ict > 1 && ict * per_ic > budget) --ict;
  if (ict * per_ic > budget)
    throw ValueError(std::string(op) + ": kernel/dilation too large for the CUDA kernel (taps " + std::to_string(p.taps) + ", span " +
                     std::to_string(span) + ")");
  p.ict = int(ict);
  const size_t smem = size_t(ict * per_ic) * sizeof(float);
  dim3 grid(unsigned((p.nq + kSimtT - 1) / kSimtT), unsigned((p.Cout + kSimtOC - 1) / kSimtOC), unsigned(B));
  conv_simt<T><<<grid, kSimtThreads, smem, st>>>(p);
  check_launch(op);
}

template <class T>
Conv1dProblem<T> base_problem(const TensorRef& x, const TensorRef& bias, const TensorRef& out, bool lrelu, float slope) {
  Conv1dProblem<T> p{};
  p.x = x.ptr<T>();
  p.xsb = x.stride(0);
  p.xsc = x.stride(1);
  p.Tin = x.size(2);
  p.Cin = int(x.size(1));
  p.bias = bias.ndim >= 0 ? bias.ptr<T>() : nullptr;
  p.Cout = int(out.size(1));
  p.out = out.ptr<T>();
  p.osb = out.stride(0);
  p.osc = out.stride(1);
  p.alpha = 1.f;
  p.lrelu = lrelu;
  p.slope = slope;
  return p;
}

}  // namespace

void conv1d(const Conv1dArgs& a, int64_t stream) {
  const int64_t B = a.x.size(0), Tout = a.out.size(2);
  if (B == 0 || Tout == 0 || a.out.size(1) == 0) return;
  dispatch_cuda_float(a.x.dtype, "conv1d", "x", [&](auto tag) {
    using T = decltype(tag);
    Conv1dProblem<T> p = base_problem<T>(a.x, a.bias, a.out, a.lrelu, a.slope);
    const int K = int(a.weight.size(2));
    p.w = a.weight.ptr<T>();
    p.wso = int64_t(p.Cin) * K;
    p.wsi = K;
    p.wsk = 1;
    p.taps = K;
    p.dil = a.dilation;
    p.x_off = -a.pad_left;
    p.ostride = 1;
    p.o_off = 0;
    p.q_lo = 0;
    p.nq = Tout;
    if (a.residual.ndim >= 0) {
      p.res = a.residual.ptr<T>();
      p.rsb = a.residual.stride(0);
      p.rsc = a.residual.stride(1);
    }
    if (a.accum.ndim >= 0 && a.beta != 0.f) {
      p.acc = a.accum.ptr<T>();
      p.asb = a.accum.stride(0);
      p.asc = a.accum.stride(1);
    }
    p.alpha = a.alpha;
    p.beta = a.beta;
    p.tanh_out = a.tanh_out;
    launch<T>("conv1d", p, B, as_stream(stream));
  });
}

void conv_transpose1d(const ConvTranspose1dArgs& a, int64_t stream) {
  const int64_t B = a.x.size(0), Tout = a.out.size(2);
  if (B == 0 || Tout == 0 || a.out.size(1) == 0) return;
  const int64_t s = a.stride, pl = a.pad_left;
  const int K = int(a.weight.size(2));
  dispatch_cuda_float(a.x.dtype, "conv_transpose1d", "x", [&](auto tag) {
    using T = decltype(tag);
    // One launch per output phase r: outputs t = s*q + r - pl, y = sum_{m<Kr} w[r + s*(Kr-1-m)] x[q - (Kr-1) + m].
    for (int64_t r = 0; r < s; ++r) {
      Conv1dProblem<T> p = base_problem<T>(a.x, a.bias, a.out, a.lrelu, a.slope);
      const int64_t q_lo = r >= pl ? 0 : (pl - r + s - 1) / s;
      const int64_t last = pl + Tout - 1 - r;
      const int64_t q_hi = last >= 0 ? last / s : -1;
      p.q_lo = q_lo;
      p.nq = q_hi - q_lo + 1;
      if (p.nq <= 0) continue;
      const int Kr = K > r ? int((K - r + s - 1) / s) : 0;
      p.taps = Kr;
      p.dil = 1;
      p.x_off = -(Kr - 1);
      p.w = a.weight.ptr<T>() + (Kr > 0 ? r + s * (Kr - 1) : 0);
      p.wso = K;
      p.wsi = a.out.size(1) * K;
      p.wsk = -s;
      p.ostride = s;
      p.o_off = r - pl;
      launch<T>("conv_transpose1d", p, B, as_stream(stream));
    }
  });
}

}  // namespace vita::cuda
