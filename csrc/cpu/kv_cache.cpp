// KV-cache write: k_cache.view(-1, Hkv, D)[slot] = k[t] for every slot >= 0 (any block size).
#include <cstring>

#include "vita/dtype.h"
#include "vita/kernels/attention.h"
#include "vita/parallel.h"

namespace vita::cpu {
namespace {

template <class T, class I>
void store_kv_impl(const StoreKvArgs& a) {
  const int64_t T_ = a.k.size(0), H = a.k.size(1), D = a.k.size(2);
  const int64_t bs = a.k_cache.size(1);
  const I* slots = a.slot_mapping.ptr<I>();
  const int64_t ss = a.slot_mapping.stride(0);
  const T* K = a.k.ptr<T>();
  const T* V = a.v.ptr<T>();
  T* KC = a.k_cache.ptr<T>();
  T* VC = a.v_cache.ptr<T>();
  // Chunks of >= 64K elements: a decode step's rows are copied inline, since even a spinning
  // worker costs a few microseconds, while a 256-token chunk (256K elements per cache) is split.
  parallel_for(T_, std::max<int64_t>(1, (int64_t(1) << 16) / (H * D + 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t s = int64_t(slots[t * ss]);
      if (s < 0) continue;
      const int64_t blk = s / bs, off = s % bs;
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(KC + blk * a.k_cache.stride(0) + off * a.k_cache.stride(1) + h * a.k_cache.stride(2),
                    K + t * a.k.stride(0) + h * a.k.stride(1), size_t(D) * sizeof(T));
        std::memcpy(VC + blk * a.v_cache.stride(0) + off * a.v_cache.stride(1) + h * a.v_cache.stride(2),
                    V + t * a.v.stride(0) + h * a.v.stride(1), size_t(D) * sizeof(T));
      }
    }
  });
}

}  // namespace

void store_kv(const StoreKvArgs& a) {
  dispatch_float(a.k.dtype, "store_kv", "k", [&](auto d) {
    using T = typename CpuType<decltype(d)::value>::type;
    dispatch_index(a.slot_mapping.dtype, "store_kv", "slot_mapping", [&](auto i) { store_kv_impl<T, decltype(i)>(a); });
  });
}

}  // namespace vita::cpu
