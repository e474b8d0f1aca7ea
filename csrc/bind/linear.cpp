#include "common.h"
#include "vita/kernels/linear.h"

namespace vita::bind {

namespace {

void linear_small_m(py::handle x_, py::handle w_, py::handle b_, py::handle out_) {
  Call c("linear_small_m");
  LinearArgs a{};
  a.x = c.arg(x_, "x");
  a.w = c.arg(w_, "weight");
  a.bias = c.opt(b_, "bias");
  a.out = c.arg(out_, "out");
  c.ck.ndim(a.x, 2, "[rows, in_features]");
  c.ck.on_cpu(a.x);
  if (a.x.dtype != DType::kFloat32 && a.x.dtype != DType::kBFloat16)
    c.ck.type_error("x must be float32 or bfloat16, got " + std::string(dtype_name(a.x.dtype)));
  if (a.x.size(0) > kLinearMaxRows)
    c.ck.value_error("x must have at most " + std::to_string(kLinearMaxRows) + " rows, got " + a.x.shape_str());
  c.ck.rows_dense(a.x);
  c.ck.ndim(a.w, 2, "[out_features, in_features]");
  c.ck.dim(a.w, 1, a.x.size(1), "in_features of x");
  c.ck.same_dtype(a.x, a.w);
  c.ck.same_device(a.x, a.w);
  if (a.w.numel() > 0) c.ck.contiguous(a.w);  // an empty [N, 0] view may carry any strides
  if (a.bias.ndim >= 0) {
    c.ck.ndim(a.bias, 1, "[out_features]");
    c.ck.dim(a.bias, 0, a.w.size(0), "out_features of weight");
    c.ck.same_dtype(a.x, a.bias);
    c.ck.same_device(a.x, a.bias);
    c.ck.contiguous(a.bias);
  }
  c.ck.ndim(a.out, 2, "[rows, out_features]");
  c.ck.dim(a.out, 0, a.x.size(0), "rows of x");
  c.ck.dim(a.out, 1, a.w.size(0), "out_features of weight");
  c.ck.same_dtype(a.x, a.out);
  c.ck.same_device(a.x, a.out);
  c.ck.rows_dense(a.out);
  c.ck.writable(a.out);
  route(c, a.x, [&] { cpu::linear_small_m(a); }, [&] {});
}

}  // namespace

void register_linear(py::module_& m) {
  m.def("linear_small_m", &linear_small_m, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        "out = x @ weight^T (+ bias) for CPU x [rows <= 32, K], weight [N, K] (torch's layout), float32/bfloat16.");
  m.attr("LINEAR_SMALL_M_MAX_ROWS") = kLinearMaxRows;
}

}  // namespace vita::bind
