// Bindings for the attention family: store_kv, paged_attention, varlen_attention,
// paged_attention_num_splits.
//
// Validation: shapes, dtypes and devices are checked for every call. On CPU the metadata values
// (cu_q_lens / cu_seqlens monotone and ending at T, kv_len >= q_len, the block table long enough
// for kv_len, block ids and slots in range) are checked too, since they live on the host. On CUDA
// they live on the device: only shape / dtype / device checks are possible there without a host
// sync (which would break CUDA-graph capture); out-of-range values are the caller's contract.
#include <cmath>
#include <string>

#include "common.h"
#include "vita/dtype.h"
#include "vita/kernels/attention.h"

namespace vita::bind {

namespace {

std::string S(int64_t v) { return std::to_string(v); }

void dense_last(const Check& ck, const TensorRef& t) {
  if (t.ndim >= 1 && t.size(-1) > 1 && t.stride(-1) != 1)
    ck.value_error(std::string(t.name) + " must have a dense last dimension (call .contiguous())");
}

float resolve_scale(const Check& ck, py::handle scale, int64_t D) {
  if (scale.is_none()) return float(1.0 / std::sqrt(double(D)));
  double s = scale.cast<double>();
  if (!std::isfinite(s)) ck.value_error("scale must be finite, got " + std::to_string(s));
  return float(s);
}

void check_head_dim(const Check& ck, const TensorRef& q) {
  const int64_t D = q.size(2);
  if (D < 1 || D > 256) ck.value_error(std::string(q.name) + " head_dim must be in [1, 256], got " + q.shape_str());
}

// The q / k / v / out checks both attention entry points start with: q floating [tokens, q_heads,
// head_dim]; k (k_ndim dims, layout in the message) and v of one shape; k, v, out of q's dtype and
// device; every last dimension dense.
void check_q_kv_out(const Check& ck, const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out, int k_ndim,
                    const char* k_layout) {
  ck.floating(q);
  ck.ndim(q, 3, "[tokens, q_heads, head_dim]");
  check_head_dim(ck, q);
  ck.ndim(k, k_ndim, k_layout);
  ck.same_shape(k, v);
  for (const TensorRef* t : {&k, &v, &out}) {
    ck.same_dtype(q, *t);
    ck.same_device(q, *t);
  }
  for (const TensorRef* t : {&q, &k, &v, &out}) dense_last(ck, *t);
}

// GQA: q heads a multiple of k's kv heads.
void check_gqa(const Check& ck, const TensorRef& q, const TensorRef& k, int64_t Hkv) {
  const int64_t Hq = q.size(1);
  if (Hkv < 1 || Hq % Hkv)
    ck.value_error("q heads (" + S(Hq) + ") must be a multiple of " + k.name + " kv_heads (" + S(Hkv) + "), got q " + q.shape_str() +
                   " and " + k.name + " " + k.shape_str());
}

// cu: int32 [B+1] on the host; must start at 0, be non-decreasing and end at T.
void check_cu(const Check& ck, const TensorRef& cu, int64_t T) {
  const int32_t* c = cu.ptr<int32_t>();
  const int64_t n = cu.size(0), st = cu.stride(0);
  if (c[0] != 0) ck.value_error(std::string(cu.name) + "[0] must be 0, got " + S(c[0]));
  for (int64_t i = 1; i < n; ++i)
    if (c[i * st] < c[(i - 1) * st])
      ck.value_error(std::string(cu.name) + " must be non-decreasing, got " + S(c[(i - 1) * st]) + " then " + S(c[i * st]) +
                     " at index " + S(i));
  if (c[(n - 1) * st] != T)
    ck.value_error(std::string(cu.name) + "[-1] must equal the number of tokens " + S(T) + ", got " + S(c[(n - 1) * st]));
}

void store_kv(py::handle k_, py::handle v_, py::handle kc_, py::handle vc_, py::handle slots_, int64_t stream) {
  Call c("store_kv");
  StoreKvArgs a{};
  a.k = c.arg(k_, "k");
  a.v = c.arg(v_, "v");
  a.k_cache = c.arg(kc_, "k_cache");
  a.v_cache = c.arg(vc_, "v_cache");
  a.slot_mapping = c.arg(slots_, "slot_mapping");
  const Check& ck = c.ck;
  ck.floating(a.k);
  ck.ndim(a.k, 3, "[tokens, kv_heads, head_dim]");
  ck.same_shape(a.k, a.v);
  ck.ndim(a.k_cache, 4, "[blocks, block_size, kv_heads, head_dim]");
  ck.same_shape(a.k_cache, a.v_cache);
  ck.dim(a.k_cache, 2, a.k.size(1), "kv_heads of k");
  ck.dim(a.k_cache, 3, a.k.size(2), "head_dim of k");
  for (const TensorRef* t : {&a.v, &a.k_cache, &a.v_cache}) {
    ck.same_dtype(a.k, *t);
    ck.same_device(a.k, *t);
  }
  for (const TensorRef* t : {&a.k, &a.v, &a.k_cache, &a.v_cache}) dense_last(ck, *t);
  ck.writable(a.k_cache);
  ck.writable(a.v_cache);
  ck.ndim(a.slot_mapping, 1, "[tokens]");
  ck.index(a.slot_mapping);
  ck.dim(a.slot_mapping, 0, a.k.size(0), "tokens of k");
  ck.same_device(a.k, a.slot_mapping);
  if (!a.k.is_cuda()) {
    const int64_t nslots = a.k_cache.size(0) * a.k_cache.size(1);
    dispatch_index(a.slot_mapping.dtype, "store_kv", "slot_mapping", [&](auto i) {
      using I = decltype(i);
      const I* s = a.slot_mapping.ptr<I>();
      for (int64_t t = 0; t < a.slot_mapping.size(0); ++t) {
        const int64_t v = int64_t(s[t * a.slot_mapping.stride(0)]);
        if (v < -1 || v >= nslots)
          ck.value_error("slot_mapping[" + S(t) + "] must be -1 or in [0, " + S(nslots) + ") (blocks x block_size), got " + S(v));
      }
    });
  }
  route(c, a.k, [&] { cpu::store_kv(a); }, [&] { VITA_CUDA_CALL(cuda::store_kv(a, stream)); });
}

void paged_attention(py::handle q_, py::handle kc_, py::handle vc_, py::handle bt_, py::handle kvl_, py::handle cu_, py::handle out_,
                     py::handle scale, bool causal, int max_q_len, int num_splits, py::handle ws_, int64_t stream) {
  Call c("paged_attention");
  PagedAttentionArgs a{};
  a.q = c.arg(q_, "q");
  a.k_cache = c.arg(kc_, "k_cache");
  a.v_cache = c.arg(vc_, "v_cache");
  a.block_table = c.arg(bt_, "block_table");
  a.kv_lens = c.arg(kvl_, "kv_lens");
  a.cu_q_lens = c.arg(cu_, "cu_q_lens");
  a.out = c.arg(out_, "out");
  a.workspace = c.opt(ws_, "workspace");
  const Check& ck = c.ck;
  check_q_kv_out(ck, a.q, a.k_cache, a.v_cache, a.out, 4, "[blocks, block_size, kv_heads, head_dim]");
  ck.dim(a.k_cache, 3, a.q.size(2), "head_dim of q");
  const int64_t T = a.q.size(0), Hq = a.q.size(1), Hkv = a.k_cache.size(2), bs = a.k_cache.size(1);
  check_gqa(ck, a.q, a.k_cache, Hkv);
  if (bs < 1) ck.value_error("k_cache block_size must be >= 1, got " + a.k_cache.shape_str());
  ck.same_shape(a.q, a.out);
  ck.writable(a.out);
  ck.ndim(a.block_table, 2, "[batch, max_blocks]");
  ck.dtype(a.block_table, DType::kInt32);
  ck.ndim(a.kv_lens, 1, "[batch]");
  ck.dtype(a.kv_lens, DType::kInt32);
  ck.ndim(a.cu_q_lens, 1, "[batch + 1]");
  ck.dtype(a.cu_q_lens, DType::kInt32);
  const int64_t B = a.kv_lens.size(0);
  ck.dim(a.block_table, 0, B, "batch of kv_lens");
  ck.dim(a.cu_q_lens, 0, B + 1, "batch of kv_lens + 1");
  for (const TensorRef* t : {&a.block_table, &a.kv_lens, &a.cu_q_lens}) ck.same_device(a.q, *t);
  if (num_splits < 1) ck.value_error("num_splits must be >= 1, got " + S(num_splits));
  if (max_q_len < 0) ck.value_error("max_q_len must be >= 0, got " + S(max_q_len));
  a.scale = resolve_scale(ck, scale, a.q.size(2));
  a.causal = causal;
  a.num_splits = num_splits;
  a.max_q_len = max_q_len;
  if (!a.q.is_cuda()) {
    check_cu(ck, a.cu_q_lens, T);
    const int32_t* cu = a.cu_q_lens.ptr<int32_t>();
    const int32_t* kl = a.kv_lens.ptr<int32_t>();
    const int32_t* bt = a.block_table.ptr<int32_t>();
    const int64_t cus = a.cu_q_lens.stride(0), kls = a.kv_lens.stride(0);
    const int64_t nblk = a.k_cache.size(0), maxb = a.block_table.size(1);
    int64_t mq = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t ql = cu[(b + 1) * cus] - cu[b * cus], kv = kl[b * kls];
      mq = std::max(mq, ql);
      if (kv < ql)
        ck.value_error("kv_lens[" + S(b) + "] (" + S(kv) + ") must be >= the sequence's q_len (" + S(ql) +
                       ") (kv_lens include this step's tokens)");
      const int64_t need = ceil_div(kv, bs);
      if (need > maxb)
        ck.value_error("block_table has " + S(maxb) + " blocks per sequence but kv_lens[" + S(b) + "] = " + S(kv) + " needs " +
                       S(need) + " blocks of " + S(bs));
      for (int64_t i = 0; i < need; ++i) {
        const int64_t id = bt[b * a.block_table.stride(0) + i * a.block_table.stride(1)];
        if (id < 0 || id >= nblk)
          ck.value_error("block_table[" + S(b) + ", " + S(i) + "] must be in [0, " + S(nblk) + ") (k_cache blocks), got " + S(id));
      }
    }
    a.max_q_len = int(mq);
  } else if (num_splits > 1) {
    const int64_t need = paged_attention_workspace_floats(T, Hq, a.q.size(2), num_splits);
    if (a.workspace.ndim < 0) ck.value_error("workspace is required when num_splits > 1 (" + S(need) + " float32)");
    ck.dtype(a.workspace, DType::kFloat32);
    ck.same_device(a.q, a.workspace);
    ck.contiguous(a.workspace);
    ck.writable(a.workspace);
    if (a.workspace.numel() < need)
      ck.value_error("workspace must hold at least " + S(need) + " float32 for num_splits " + S(num_splits) + ", got " +
                     S(a.workspace.numel()));
    if (max_q_len < 1 && T > 0) ck.value_error("max_q_len must be >= 1 on CUDA, got " + S(max_q_len));
  } else if (max_q_len < 1 && T > 0) {
    ck.value_error("max_q_len must be >= 1 on CUDA, got " + S(max_q_len));
  }
  route(c, a.q, [&] { cpu::paged_attention(a); }, [&] { VITA_CUDA_CALL(cuda::paged_attention(a, stream)); });
}

void varlen_attention(py::handle q_, py::handle k_, py::handle v_, py::handle cu_, py::handle out_, bool causal, py::handle kb_,
                      py::handle scale, int max_seqlen, int64_t stream) {
  Call c("varlen_attention");
  VarlenAttentionArgs a{};
  a.q = c.arg(q_, "q");
  a.k = c.arg(k_, "k");
  a.v = c.arg(v_, "v");
  a.cu_seqlens = c.arg(cu_, "cu_seqlens");
  a.out = c.arg(out_, "out");
  a.key_bias = c.opt(kb_, "key_bias");
  const Check& ck = c.ck;
  check_q_kv_out(ck, a.q, a.k, a.v, a.out, 3, "[tokens, kv_heads, head_dim]");
  const int64_t T = a.q.size(0), Hq = a.q.size(1), Hkv = a.k.size(1);
  ck.dim(a.k, 0, T, "tokens of q");
  ck.dim(a.k, 2, a.q.size(2), "head_dim of q");
  check_gqa(ck, a.q, a.k, Hkv);
  ck.same_shape(a.q, a.out);
  ck.writable(a.out);
  ck.ndim(a.cu_seqlens, 1, "[batch + 1]");
  ck.dtype(a.cu_seqlens, DType::kInt32);
  ck.same_device(a.q, a.cu_seqlens);
  if (a.cu_seqlens.size(0) < 1) ck.value_error("cu_seqlens must have at least 1 element [batch + 1], got " + a.cu_seqlens.shape_str());
  if (a.key_bias.ndim >= 0) {
    ck.ndim(a.key_bias, 2, "[q_heads, tokens]");
    ck.dim(a.key_bias, 0, Hq, "q_heads of q");
    ck.dim(a.key_bias, 1, T, "tokens of q");
    ck.floating(a.key_bias);
    ck.same_device(a.q, a.key_bias);
  }
  a.scale = resolve_scale(ck, scale, a.q.size(2));
  a.causal = causal;
  a.max_seqlen = max_seqlen;
  if (!a.q.is_cuda()) {
    check_cu(ck, a.cu_seqlens, T);
    const int32_t* cu = a.cu_seqlens.ptr<int32_t>();
    int64_t mx = 0;
    for (int64_t b = 0; b + 1 < a.cu_seqlens.size(0); ++b)
      mx = std::max<int64_t>(mx, cu[(b + 1) * a.cu_seqlens.stride(0)] - cu[b * a.cu_seqlens.stride(0)]);
    a.max_seqlen = int(mx);
  } else if (max_seqlen < 1 && T > 0) {
    ck.value_error("max_seqlen must be >= 1 on CUDA, got " + S(max_seqlen));
  }
  route(c, a.q, [&] { cpu::varlen_attention(a); }, [&] { VITA_CUDA_CALL(cuda::varlen_attention(a, stream)); });
}

int num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_kv_len, int max_q_len, int device) {
#ifdef VITA_WITH_CUDA
  if (device >= 0) {
    cuda_set_device(device);
    return cuda::paged_attention_num_splits(batch, num_kv_heads, max_kv_len, max_q_len, device);
  }
#endif
  (void)batch, (void)num_kv_heads, (void)max_kv_len, (void)max_q_len, (void)device;
  return 1;
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("store_kv", &store_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("stream") = 0, "In place: k_cache.view(-1, Hkv, D)[slot] = k[t] (same for v) for every slot >= 0.");
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
        py::arg("kv_lens"), py::arg("cu_q_lens"), py::arg("out"), py::arg("scale") = py::none(), py::arg("causal") = true,
        py::arg("max_q_len") = 0, py::arg("num_splits") = 1, py::arg("workspace") = py::none(), py::arg("stream") = 0,
        "Attention of packed queries over a paged KV cache (metadata int32). CUDA: max_q_len >= 1 and, when num_splits > 1, "
        "a float32 workspace of paged_attention_workspace_floats(T, Hq, D, num_splits). CPU: num_splits > 1 forces split-KV, "
        "1 lets the kernel choose.");
  m.def("varlen_attention", &varlen_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("out"),
        py::arg("causal") = false, py::arg("key_bias") = py::none(), py::arg("scale") = py::none(), py::arg("max_seqlen") = 0,
        py::arg("stream") = 0, "Attention over contiguous packed sequences; key_bias [Hq, T] is added to every score of that key.");
  m.def("paged_attention_num_splits", &num_splits, py::arg("batch"), py::arg("num_kv_heads"), py::arg("max_kv_len"),
        py::arg("max_q_len"), py::arg("device") = -1, "Split-KV partitions the CUDA kernel wants for this layout (1 on CPU).");
  m.def(
      "paged_attention_workspace_floats",
      [](int64_t T, int64_t Hq, int64_t D, int ns) { return paged_attention_workspace_floats(T, Hq, D, ns); }, py::arg("total_q"),
      py::arg("num_q_heads"), py::arg("head_dim"), py::arg("num_splits"));
}

}  // namespace vita::bind
