#include <cstring>
#include <string>
#include <vector>

#include "vita/dtype.h"
#include "vita/kernels/elementwise.h"
#include "vita/parallel.h"

namespace vita::cpu {
namespace {

template <class I>
void fuse_impl(const FuseArgs& a) {
  Check ck{"fuse_embeddings"};
  const int64_t T = a.ids.size(0), V = a.embed.size(0), H = a.embed.size(1);
  const int64_t M = a.mm.ndim < 0 ? 0 : a.mm.size(0);
  const I* ids = a.ids.ptr<I>();
  const int64_t ist = a.ids.stride(0);
  // Validate everything before writing anything: a bad id must not leave a half-fused output.
  std::vector<int64_t> src(T);
  int64_t next_mm = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = int64_t(ids[t * ist]);
    if (id >= V)
      ck.value_error("input_ids[" + std::to_string(t) + "] = " + std::to_string(id) + " is out of range for embed_weight with " +
                     std::to_string(V) + " rows");
    src[t] = id >= 0 ? id : -1 - next_mm++;
  }
  if (next_mm != M)
    ck.value_error("input_ids has " + std::to_string(next_mm) + " multimodal placeholder rows (id < 0) but mm_features has " +
                   std::to_string(M) + " rows");
  const int64_t es = dtype_size(a.out.dtype);
  const char* E = static_cast<const char*>(a.embed.data);
  const char* F = static_cast<const char*>(a.mm.data);
  char* O = static_cast<char*>(a.out.data);
  const int64_t se = a.embed.stride(0) * es, sm = M ? a.mm.stride(0) * es : 0, so = a.out.stride(0) * es;
  parallel_for(T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const char* s = src[t] >= 0 ? E + src[t] * se : F + (-1 - src[t]) * sm;
      std::memcpy(O + t * so, s, size_t(H * es));
    }
  });
}

}  // namespace

void fuse_embeddings(const FuseArgs& a) {
  dispatch_index(a.ids.dtype, "fuse_embeddings", "input_ids", [&](auto i) { fuse_impl<decltype(i)>(a); });
}

}  // namespace vita::cpu
