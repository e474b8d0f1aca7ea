#include "common.h"
#include "vita/kernels/sampling.h"

namespace vita::bind {
namespace {

void sample_tokens(py::handle logits_, py::handle out_, py::handle temp_, py::handle topk_, py::handle seed_, py::handle step_,
                   int64_t stream) {
  Call c("sample_tokens");
  SampleArgs a{};
  a.logits = c.arg(logits_, "logits");
  a.out = c.arg(out_, "out");
  a.temperature = c.arg(temp_, "temperature");
  a.top_k = c.arg(topk_, "top_k");
  a.seed = c.arg(seed_, "seed");
  a.step = c.arg(step_, "step");
  c.ck.ndim(a.logits, 2, "[batch, vocab]");
  c.ck.floating(a.logits);
  if (a.logits.size(1) < 1) c.ck.value_error("logits must have at least one vocabulary entry, got " + a.logits.shape_str());
  if (a.logits.size(1) > 1 && a.logits.stride(1) != 1) c.ck.value_error("logits must have a dense last dimension");
  const int64_t B = a.logits.size(0);
  struct Meta {
    TensorRef* t;
    DType d;
  };
  for (Meta m : {Meta{&a.out, DType::kInt64}, Meta{&a.temperature, DType::kFloat32}, Meta{&a.top_k, DType::kInt32},
                 Meta{&a.seed, DType::kInt64}, Meta{&a.step, DType::kInt64}}) {
    c.ck.ndim(*m.t, 1, "[batch]");
    c.ck.dim(*m.t, 0, B, "batch of logits");
    c.ck.dtype(*m.t, m.d);
    c.ck.same_device(a.logits, *m.t);
    if (m.t != &a.out) c.ck.contiguous(*m.t);
  }
  c.ck.writable(a.out);
  // CUDA supports top_k <= kMaxTopKCuda (larger values are clamped in the kernel); the ops wrapper
  // rejects larger values on the host before they reach the device.
  route(c, a.logits, [&] { cpu::sample_tokens(a); }, [&] { VITA_CUDA_CALL(cuda::sample_tokens(a, stream)); });
}

}  // namespace

void register_sampling(py::module_& m) {
  m.def("sample_tokens", &sample_tokens, py::arg("logits"), py::arg("out"), py::arg("temperature"), py::arg("top_k"), py::arg("seed"),
        py::arg("step"), py::arg("stream") = 0,
        "Greedy / top-k / full-vocabulary sampling by Gumbel-max with a Philox counter RNG keyed by (seed, step, token id).");
}

}  // namespace vita::bind
