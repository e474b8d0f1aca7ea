#include "common.h"
#include "vita/kernels/codec.h"

namespace vita::bind {

namespace {

bool time_dense(const TensorRef& t) { return t.size(2) <= 1 || t.stride(2) == 1; }

void check_act(Call& c, const TensorRef& t, const char* layout) {
  c.ck.ndim(t, 3, layout);
  if (!time_dense(t)) c.ck.value_error(std::string(t.name) + " must have a dense last (time) dimension, got strides (" +
                                       std::to_string(t.stride(0)) + ", " + std::to_string(t.stride(1)) + ", " +
                                       std::to_string(t.stride(2)) + ")");
}

void check_like_out(Call& c, const TensorRef& out, const TensorRef& t) {
  check_act(c, t, "[batch, out_channels, time]");
  c.ck.same_shape(out, t);
  c.ck.same_dtype(out, t);
  c.ck.same_device(out, t);
}

void check_bias(Call& c, const TensorRef& x, const TensorRef& bias, int64_t cout) {
  if (bias.ndim < 0) return;
  c.ck.ndim(bias, 1, "[out_channels]");
  c.ck.dim(bias, 0, cout, "out_channels");
  c.ck.same_dtype(x, bias);
  c.ck.same_device(x, bias);
  c.ck.contiguous(bias);
}

// Checks shared by conv1d and conv_transpose1d: x, weight (torch layout: the input-channel dim is
// `cin_dim`, the output-channel dim `cout_dim`), bias and out.
void check_conv(Call& c, const TensorRef& x, const TensorRef& weight, const TensorRef& bias, const TensorRef& out, int cin_dim,
                   int cout_dim, const char* weight_layout) {
  c.ck.floating(x);
  check_act(c, x, "[batch, in_channels, time]");
  c.ck.ndim(weight, 3, weight_layout);
  c.ck.same_dtype(x, weight);
  c.ck.same_device(x, weight);
  c.ck.contiguous(weight);
  c.ck.dim(weight, cin_dim, x.size(1), "in_channels of x");
  if (weight.size(2) < 1) c.ck.value_error("weight kernel size must be >= 1, got " + weight.shape_str());
  const int64_t cout = weight.size(cout_dim);
  check_bias(c, x, bias, cout);
  check_act(c, out, "[batch, out_channels, time]");
  c.ck.same_dtype(x, out);
  c.ck.same_device(x, out);
  c.ck.dim(out, 0, x.size(0), "batch of x");
  c.ck.dim(out, 1, cout, "out_channels of weight");
  c.ck.writable(out);
}

void conv1d(py::handle x_, py::handle w_, py::handle b_, py::handle out_, py::handle res_, py::handle acc_, int64_t pad_left, int dilation,
            py::handle slope_, double alpha, double beta, bool tanh_out, int64_t stream) {
  Call c("conv1d");
  Conv1dArgs a{};
  a.x = c.arg(x_, "x");
  a.weight = c.arg(w_, "weight");
  a.bias = c.opt(b_, "bias");
  a.out = c.arg(out_, "out");
  a.residual = c.opt(res_, "residual");
  a.accum = c.opt(acc_, "accum");
  check_conv(c, a.x, a.weight, a.bias, a.out, 1, 0, "[out_channels, in_channels, kernel]");
  if (a.residual.ndim >= 0) check_like_out(c, a.out, a.residual);
  if (a.accum.ndim >= 0) check_like_out(c, a.out, a.accum);
  if (pad_left < 0) c.ck.value_error("pad_left must be >= 0, got " + std::to_string(pad_left));
  if (dilation < 1) c.ck.value_error("dilation must be >= 1, got " + std::to_string(dilation));
  if (a.x.data == a.out.data && a.out.numel() > 0) c.ck.value_error("out must not alias x");
  a.pad_left = pad_left;
  a.dilation = dilation;
  a.lrelu = !slope_.is_none();
  a.slope = a.lrelu ? float(slope_.cast<double>()) : 0.f;
  a.alpha = float(alpha);
  a.beta = a.accum.ndim >= 0 ? float(beta) : 0.f;
  a.tanh_out = tanh_out;
  route(c, a.x, [&] { cpu::conv1d(a); }, [&] { VITA_CUDA_CALL(cuda::conv1d(a, stream)); });
}

void conv_transpose1d(py::handle x_, py::handle w_, py::handle b_, py::handle out_, int stride, int64_t pad_left, py::handle slope_,
                      int64_t stream) {
  Call c("conv_transpose1d");
  ConvTranspose1dArgs a{};
  a.x = c.arg(x_, "x");
  a.weight = c.arg(w_, "weight");
  a.bias = c.opt(b_, "bias");
  a.out = c.arg(out_, "out");
  check_conv(c, a.x, a.weight, a.bias, a.out, 0, 1, "[in_channels, out_channels, kernel]");
  if (stride < 1) c.ck.value_error("stride must be >= 1, got " + std::to_string(stride));
  if (pad_left < 0) c.ck.value_error("pad_left must be >= 0, got " + std::to_string(pad_left));
  if (a.x.data == a.out.data && a.out.numel() > 0) c.ck.value_error("out must not alias x");
  a.stride = stride;
  a.pad_left = pad_left;
  a.lrelu = !slope_.is_none();
  a.slope = a.lrelu ? float(slope_.cast<double>()) : 0.f;
  route(c, a.x, [&] { cpu::conv_transpose1d(a); }, [&] { VITA_CUDA_CALL(cuda::conv_transpose1d(a, stream)); });
}

}  // namespace

void register_codec(py::module_& m) {
  m.def("conv1d", &conv1d, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("residual") = py::none(),
        py::arg("accum") = py::none(), py::arg("pad_left") = 0, py::arg("dilation") = 1, py::arg("lrelu_slope") = py::none(),
        py::arg("alpha") = 1.0, py::arg("beta") = 0.0, py::arg("tanh") = false, py::arg("stream") = 0,
        "out = post(alpha * (bias + residual + conv(lrelu(x))) + beta * accum); stride 1, zero padding "
        "(pad_left explicit, right padding implied by out's length). residual/accum may alias out.");
  m.def("conv_transpose1d", &conv_transpose1d, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("stride"),
        py::arg("pad_left") = 0, py::arg("lrelu_slope") = py::none(), py::arg("stream") = 0,
        "out = bias + conv_transpose(lrelu(x)); weight [in, out, K]; out's length sets the right crop.");
}

}  // namespace vita::bind
