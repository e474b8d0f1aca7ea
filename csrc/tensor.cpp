#include "vita/tensor.h"

namespace vita {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kInt16: return "int16";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
    default: return "unsupported dtype";
  }
}

int64_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kInt16: return 2;
    default: return 1;
  }
}

std::string device_name(Device d) {
  switch (d.type) {
    case DeviceType::kCPU: return "cpu";
    case DeviceType::kCUDA: return "cuda:" + std::to_string(d.index);
    default: return "unsupported device";
  }
}

std::string TensorRef::shape_str() const {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << shape[i];
  if (ndim == 1) s << ",";
  s << ")";
  return s.str();
}

void Check::value_error(const std::string& msg) const { throw ValueError(std::string(op) + ": " + msg); }
void Check::type_error(const std::string& msg) const { throw TypeError(std::string(op) + ": " + msg); }

void Check::ndim(const TensorRef& t, int nd, const char* layout) const {
  if (t.ndim != nd)
    value_error(std::string(t.name) + " must be " + std::to_string(nd) + "-D " + layout + ", got " + t.shape_str());
}
void Check::ndim_in(const TensorRef& t, int lo, int hi, const char* layout) const {
  if (t.ndim < lo || t.ndim > hi)
    value_error(std::string(t.name) + " must be " + std::to_string(lo) + "-D to " + std::to_string(hi) + "-D " + layout +
                ", got " + t.shape_str());
}
void Check::dim(const TensorRef& t, int i, int64_t expect, const char* what) const {
  if (t.size(i) != expect)
    value_error(std::string(t.name) + " dim " + std::to_string(i) + " (" + what + ") must be " + std::to_string(expect) +
                ", got " + t.shape_str());
}
void Check::floating(const TensorRef& t) const {
  if (t.dtype != DType::kFloat32 && t.dtype != DType::kFloat16 && t.dtype != DType::kBFloat16)
    type_error(std::string(t.name) + " must be float32, float16 or bfloat16, got " + dtype_name(t.dtype));
}
void Check::index(const TensorRef& t) const {
  if (t.dtype != DType::kInt32 && t.dtype != DType::kInt64)
    type_error(std::string(t.name) + " must be int32 or int64, got " + dtype_name(t.dtype));
}
void Check::dtype(const TensorRef& t, DType d) const {
  if (t.dtype != d)
    type_error(std::string(t.name) + " must be " + dtype_name(d) + ", got " + dtype_name(t.dtype));
}
void Check::same_dtype(const TensorRef& a, const TensorRef& b) const {
  if (a.dtype != b.dtype)
    type_error(std::string(b.name) + " must have the dtype of " + a.name + " (" + dtype_name(a.dtype) + "), got " +
               dtype_name(b.dtype));
}
void Check::same_device(const TensorRef& a, const TensorRef& b) const {
  if (a.device.type != b.device.type || a.device.index != b.device.index)
    type_error(std::string(b.name) + " must be on the device of " + a.name + " (" + device_name(a.device) + "), got " +
               device_name(b.device));
}
void Check::on_cpu(const TensorRef& t) const {
  if (t.device.type != DeviceType::kCPU)
    type_error(std::string(t.name) + " must be a CPU tensor, got " + device_name(t.device));
}
void Check::contiguous(const TensorRef& t) const {
  if (!t.is_contiguous()) value_error(std::string(t.name) + " must be contiguous (call .contiguous())");
}
void Check::rows_dense(const TensorRef& t) const {
  if (!t.rows_dense())
    value_error(std::string(t.name) + " must have a dense last dimension and uniformly strided rows (call .contiguous())");
}
void Check::writable(const TensorRef& t) const {
  if (t.readonly) value_error(std::string(t.name) + " is read-only (DLPack read-only flag) but is written by this op");
}
void Check::same_shape(const TensorRef& a, const TensorRef& b) const {
  if (a.ndim != b.ndim) value_error(std::string(b.name) + " must have the shape of " + a.name + " " + a.shape_str() + ", got " + b.shape_str());
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i])
      value_error(std::string(b.name) + " must have the shape of " + a.name + " " + a.shape_str() + ", got " + b.shape_str());
}

}  // namespace vita
