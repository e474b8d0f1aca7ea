#include "common.h"
#include "vita/kernels/elementwise.h"

namespace vita::bind {

namespace {

void check_rows(Call& c, const TensorRef& x, const TensorRef& y) {
  c.ck.same_shape(x, y);
  c.ck.same_dtype(x, y);
  c.ck.same_device(x, y);
  c.ck.rows_dense(y);
}

void rms_norm(py::handle x_, py::handle w_, py::handle out_, py::handle res_, py::handle res_out_, double eps, int64_t stream,
              const char* op) {
  Call c(op);
  RmsNormArgs a{};
  a.fused_add = !res_.is_none();
  a.x = c.arg(x_, "x");
  a.weight = c.arg(w_, "weight");
  a.out = c.arg(out_, "out");
  c.ck.floating(a.x);
  if (a.x.ndim < 1) c.ck.value_error("x must have at least 1 dim [..., hidden], got " + a.x.shape_str());
  c.ck.rows_dense(a.x);
  c.ck.ndim(a.weight, 1, "[hidden]");
  c.ck.dim(a.weight, 0, a.x.size(-1), "hidden of x");
  c.ck.same_dtype(a.x, a.weight);
  c.ck.same_device(a.x, a.weight);
  c.ck.contiguous(a.weight);
  check_rows(c, a.x, a.out);
  c.ck.writable(a.out);
  if (a.fused_add) {
    a.residual = c.arg(res_, "residual");
    a.residual_out = c.arg(res_out_, "residual_out");
    check_rows(c, a.x, a.residual);
    check_rows(c, a.x, a.residual_out);
    c.ck.writable(a.residual_out);
  }
  if (!(eps >= 0)) c.ck.value_error("eps must be >= 0, got " + std::to_string(eps));
  a.eps = float(eps);
  route(c, a.x, [&] { cpu::rms_norm(a); }, [&] { VITA_CUDA_CALL(cuda::rms_norm(a, stream)); });
}

void rotary_embedding(py::handle q_, py::handle k_, py::handle pos_, py::handle qo_, py::handle ko_, double theta, int rotary_dim,
                      int64_t stream) {
  Call c("rotary_embedding");
  RopeArgs a{};
  a.q = c.arg(q_, "q");
  a.k = c.arg(k_, "k");
  a.positions = c.arg(pos_, "positions");
  a.q_out = c.arg(qo_, "q_out");
  a.k_out = c.arg(ko_, "k_out");
  c.ck.floating(a.q);
  c.ck.ndim(a.q, 3, "[tokens, q_heads, head_dim]");
  c.ck.ndim(a.k, 3, "[tokens, kv_heads, head_dim]");
  c.ck.same_dtype(a.q, a.k);
  c.ck.same_device(a.q, a.k);
  c.ck.dim(a.k, 0, a.q.size(0), "tokens of q");
  c.ck.dim(a.k, 2, a.q.size(2), "head_dim of q");
  c.ck.ndim(a.positions, 1, "[tokens]");
  c.ck.index(a.positions);
  c.ck.dim(a.positions, 0, a.q.size(0), "tokens of q");
  c.ck.same_device(a.q, a.positions);
  for (const TensorRef* t : {&a.q, &a.k, &a.q_out, &a.k_out})
    if (t->size(2) > 1 && t->stride(2) != 1) c.ck.value_error(std::string(t->name) + " must have a dense last dimension");
  c.ck.same_shape(a.q, a.q_out);
  c.ck.same_dtype(a.q, a.q_out);
  c.ck.same_device(a.q, a.q_out);
  c.ck.same_shape(a.k, a.k_out);
  c.ck.same_device(a.k, a.k_out);
  c.ck.same_dtype(a.k, a.k_out);
  c.ck.writable(a.q_out);
  c.ck.writable(a.k_out);
  const int64_t D = a.q.size(2);
  if (rotary_dim <= 0) rotary_dim = int(D);
  if (rotary_dim > D || rotary_dim % 2)
    c.ck.value_error("rotary_dim must be even and <= head_dim " + std::to_string(D) + ", got " + std::to_string(rotary_dim));
  if (!(theta > 0)) c.ck.value_error("theta must be > 0, got " + std::to_string(theta));
  a.theta = float(theta);
  a.rotary_dim = rotary_dim;
  route(c, a.q, [&] { cpu::rotary_embedding(a); }, [&] { VITA_CUDA_CALL(cuda::rotary_embedding(a, stream)); });
}

void silu_and_mul(py::handle x_, py::handle out_, int64_t stream) {
  Call c("silu_and_mul");
  SiluMulArgs a{};
  a.x = c.arg(x_, "x");
  a.out = c.arg(out_, "out");
  c.ck.floating(a.x);
  if (a.x.ndim < 1 || a.x.size(-1) % 2)
    c.ck.value_error("x must be [..., 2N] (gate | up), got " + a.x.shape_str());
  c.ck.rows_dense(a.x);
  c.ck.same_dtype(a.x, a.out);
  c.ck.same_device(a.x, a.out);
  c.ck.rows_dense(a.out);
  c.ck.writable(a.out);
  if (a.out.ndim != a.x.ndim || a.out.size(-1) * 2 != a.x.size(-1))
    c.ck.value_error("out must be [..., N] for x " + a.x.shape_str() + ", got " + a.out.shape_str());
  for (int i = 0; i < a.x.ndim - 1; ++i)
    if (a.out.size(i) != a.x.size(i)) c.ck.value_error("out must be [..., N] for x " + a.x.shape_str() + ", got " + a.out.shape_str());
  route(c, a.x, [&] { cpu::silu_and_mul(a); }, [&] { VITA_CUDA_CALL(cuda::silu_and_mul(a, stream)); });
}

void fuse_embeddings(py::handle ids_, py::handle emb_, py::handle mm_, py::handle out_, py::handle scratch_, int64_t stream) {
  Call c("fuse_embeddings");
  FuseArgs a{};
  a.ids = c.arg(ids_, "input_ids");
  a.embed = c.arg(emb_, "embed_weight");
  a.mm = c.opt(mm_, "mm_features");
  a.out = c.arg(out_, "out");
  c.ck.ndim(a.ids, 1, "[tokens]");
  c.ck.index(a.ids);
  c.ck.ndim(a.embed, 2, "[vocab, hidden]");
  c.ck.floating(a.embed);
  if (a.embed.size(1) > 1 && a.embed.stride(1) != 1) c.ck.value_error("embed_weight must have a dense last dimension");
  c.ck.same_device(a.embed, a.ids);
  if (a.mm.ndim >= 0) {
    c.ck.ndim(a.mm, 2, "[rows, hidden]");
    c.ck.dim(a.mm, 1, a.embed.size(1), "hidden of embed_weight");
    c.ck.same_dtype(a.embed, a.mm);
    c.ck.same_device(a.embed, a.mm);
    if (a.mm.size(1) > 1 && a.mm.stride(1) != 1) c.ck.value_error("mm_features must have a dense last dimension");
  }
  c.ck.ndim(a.out, 2, "[tokens, hidden]");
  c.ck.dim(a.out, 0, a.ids.size(0), "tokens of input_ids");
  c.ck.dim(a.out, 1, a.embed.size(1), "hidden of embed_weight");
  c.ck.same_dtype(a.embed, a.out);
  c.ck.same_device(a.embed, a.out);
  if (a.out.size(1) > 1 && a.out.stride(1) != 1) c.ck.value_error("out must have a dense last dimension");
  c.ck.writable(a.out);
  if (a.out.is_cuda()) {
    a.scratch = c.arg(scratch_, "scratch");
    c.ck.dtype(a.scratch, DType::kInt32);
    c.ck.same_device(a.out, a.scratch);
    if (a.scratch.numel() < a.ids.size(0) + 2) c.ck.value_error("scratch must hold tokens + 2 int32");
  }
  route(c, a.out, [&] { cpu::fuse_embeddings(a); }, [&] { VITA_CUDA_CALL(cuda::fuse_embeddings(a, stream)); });
}

}  // namespace

void register_elementwise(py::module_& m) {
  m.def(
      "rms_norm",
      [](py::handle x, py::handle w, py::handle out, double eps, int64_t stream) {
        rms_norm(x, w, out, py::none(), py::none(), eps, stream, "rms_norm");
      },
      py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("stream") = 0,
      "out = RMSNorm(x) * weight (Qwen2 rounding order). x: [..., hidden].");
  m.def(
      "fused_add_rms_norm",
      [](py::handle x, py::handle res, py::handle w, py::handle out, py::handle res_out, double eps, int64_t stream) {
        rms_norm(x, w, out, res, res_out, eps, stream, "fused_add_rms_norm");
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"), py::arg("residual_out"), py::arg("eps"),
      py::arg("stream") = 0, "residual_out = x + residual; out = RMSNorm(residual_out) * weight. Outputs may alias inputs.");
  m.def("rotary_embedding", &rotary_embedding, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("q_out"), py::arg("k_out"),
        py::arg("theta"), py::arg("rotary_dim") = 0, py::arg("stream") = 0, "NeoX rotary embedding; outputs may alias q/k.");
  m.def("silu_and_mul", &silu_and_mul, py::arg("x"), py::arg("out"), py::arg("stream") = 0, "out = silu(x[..., :N]) * x[..., N:]");
  m.def("fuse_embeddings", &fuse_embeddings, py::arg("input_ids"), py::arg("embed_weight"), py::arg("mm_features"), py::arg("out"),
        py::arg("scratch") = py::none(), py::arg("stream") = 0,
        "Gather embed_weight rows for ids >= 0 and take mm_features rows in order for ids < 0.");
}

}  // namespace vita::bind
