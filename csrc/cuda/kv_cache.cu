// KV-cache write: k_cache.view(-1, Hkv, D)[slot] = k[t] (and v) for every slot >= 0.
// One block per token; both K and V rows of all heads are copied by the block, in 16-byte words when
// every pointer and stride allows it, element by element otherwise. Any block size; slots < 0 (and,
// defensively, slots past the end of the cache) are skipped. No host sync: CUDA-graph capturable.
#include "common.cuh"
#include "vita/kernels/attention.h"

namespace vita::cuda {
namespace {

struct StoreKvParams {
  const char* k;
  const char* v;
  char* kc;
  char* vc;
  const void* slots;
  int64_t slot_stride;
  // byte strides
  int64_t sk_t, sk_h, sv_t, sv_h;
  int64_t skc_b, skc_o, skc_h, svc_b, svc_o, svc_h;
  int64_t block_size, num_slots;
  int heads, row_bytes;  // row_bytes = D * element size
};

// W: the copy word (int4 for 16-byte copies, or the element type's storage for the scalar path).
template <class I, class W>
__global__ void store_kv_kernel(StoreKvParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = int64_t(static_cast<const I*>(p.slots)[t * p.slot_stride]);
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t blk = slot / p.block_size, off = slot - blk * p.block_size;
  const int words = p.row_bytes / int(sizeof(W));
  const int total = p.heads * words;
  const char* ks = p.k + t * p.sk_t;
  const char* vs = p.v + t * p.sv_t;
  char* kd = p.kc + blk * p.skc_b + off * p.skc_o;
  char* vd = p.vc + blk * p.svc_b + off * p.svc_o;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / words, w = i - h * words;
    const W kw = reinterpret_cast<const W*>(ks + h * p.sk_h)[w];
    const W vw = reinterpret_cast<const W*>(vs + h * p.sv_h)[w];
    reinterpret_cast<W*>(kd + h * p.skc_h)[w] = kw;
    reinterpret_cast<W*>(vd + h * p.svc_h)[w] = vw;
  }
}

}  // namespace

void store_kv(const StoreKvArgs& a, int64_t stream) {
  const char* op = "store_kv";
  const int64_t T = a.k.size(0);
  if (T == 0) return;
  if (a.k.dtype != a.k_cache.dtype || a.v.dtype != a.v_cache.dtype || a.k.dtype != a.v.dtype)
    Check{op}.type_error("k, v, k_cache and v_cache must share one dtype");
  if (a.k.stride(-1) != 1 || a.v.stride(-1) != 1 || a.k_cache.stride(-1) != 1 || a.v_cache.stride(-1) != 1)
    Check{op}.value_error("k, v, k_cache and v_cache must have a dense last dimension (stride 1)");
  if (T > (int64_t(1) << 31) - 1) Check{op}.value_error("too many tokens for one launch");
  const int64_t es = dtype_size(a.k.dtype);
  StoreKvParams p;
  p.k = static_cast<const char*>(a.k.data);
  p.v = static_cast<const char*>(a.v.data);
  p.kc = static_cast<char*>(a.k_cache.data);
  p.vc = static_cast<char*>(a.v_cache.data);
  p.slots = a.slot_mapping.data;
  p.slot_stride = a.slot_mapping.ndim > 0 ? a.slot_mapping.stride(0) : 1;
  p.sk_t = a.k.stride(0) * es;
  p.sk_h = a.k.stride(1) * es;
  p.sv_t = a.v.stride(0) * es;
  p.sv_h = a.v.stride(1) * es;
  p.skc_b = a.k_cache.stride(0) * es;
  p.skc_o = a.k_cache.stride(1) * es;
  p.skc_h = a.k_cache.stride(2) * es;
  p.svc_b = a.v_cache.stride(0) * es;
  p.svc_o = a.v_cache.stride(1) * es;
  p.svc_h = a.v_cache.stride(2) * es;
  p.block_size = a.k_cache.size(1);
  p.num_slots = a.k_cache.size(0) * a.k_cache.size(1);
  p.heads = int(a.k.size(1));
  p.row_bytes = int(a.k.size(2) * es);
  if (p.heads == 0 || p.row_bytes == 0 || p.num_slots == 0) return;

  auto al16 = [](int64_t v) { return v % 16 == 0; };
  const bool wide = al16(p.row_bytes) && al16(p.sk_t) && al16(p.sk_h) && al16(p.sv_t) && al16(p.sv_h) && al16(p.skc_b) &&
                    al16(p.skc_o) && al16(p.skc_h) && al16(p.svc_b) && al16(p.svc_o) && al16(p.svc_h) &&
                    al16(int64_t(reinterpret_cast<uintptr_t>(p.k))) && al16(int64_t(reinterpret_cast<uintptr_t>(p.v))) &&
                    al16(int64_t(reinterpret_cast<uintptr_t>(p.kc))) && al16(int64_t(reinterpret_cast<uintptr_t>(p.vc)));
  const int words = wide ? p.row_bytes / 16 : p.row_bytes / int(es);
  const int64_t total = int64_t(p.heads) * words;
  const int threads = total >= 256 ? 256 : total >= 128 ? 128 : 64;
  auto s = as_stream(stream);
  dispatch_index(a.slot_mapping.dtype, op, "slot_mapping", [&](auto itag) {
    using I = decltype(itag);
    if (wide)
      store_kv_kernel<I, int4><<<unsigned(T), threads, 0, s>>>(p);
    else if (es == 4)
      store_kv_kernel<I, uint32_t><<<unsigned(T), threads, 0, s>>>(p);
    else if (es == 2)
      store_kv_kernel<I, uint16_t><<<unsigned(T), threads, 0, s>>>(p);
    else
      Check{op}.type_error(std::string("k must be float32, float16 or bfloat16, got ") + dtype_name(a.k.dtype));
  });
  check_launch(op);
}

}  // namespace vita::cuda
