// Torch-free tensor view built from a DLPack capsule, plus the error types the
// bindings translate into Python ValueError / TypeError.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

namespace vita {

// Bad argument value / shape -> Python ValueError.
class ValueError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// Wrong type / dtype / device -> Python TypeError.
class TypeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// Backend failure (CUDA error, no device) -> Python RuntimeError.
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64, kInt32, kInt64, kInt16, kInt8, kUInt8, kBool, kOther };
enum class DeviceType : int { kCPU, kCUDA, kOther };

const char* dtype_name(DType d);
int64_t dtype_size(DType d);

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
};
std::string device_name(Device d);

constexpr int kMaxDims = 8;

struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  bool readonly = false;
  const char* name = "";

  int64_t size(int i) const { return shape[i < 0 ? i + ndim : i]; }
  int64_t stride(int i) const { return strides[i < 0 ? i + ndim : i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_cuda() const { return device.type == DeviceType::kCUDA; }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  // Innermost dim dense and rows laid out with a uniform stride: what the row-wise kernels need.
  bool rows_dense() const {
    if (ndim == 0) return true;
    if (shape[ndim - 1] != 1 && strides[ndim - 1] != 1) return false;
    int64_t expect = strides[ndim - 2 >= 0 ? ndim - 2 : 0];
    for (int i = ndim - 2; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  std::string shape_str() const;
};

// Argument checks that name the op, the argument, what was expected and what came.
struct Check {
  const char* op;

  [[noreturn]] void value_error(const std::string& msg) const;
  [[noreturn]] void type_error(const std::string& msg) const;

  void ndim(const TensorRef& t, int nd, const char* layout) const;
  void ndim_in(const TensorRef& t, int lo, int hi, const char* layout) const;
  void dim(const TensorRef& t, int i, int64_t expect, const char* what) const;
  void floating(const TensorRef& t) const;            // float32/16/bf16
  void index(const TensorRef& t) const;               // int32/int64
  void dtype(const TensorRef& t, DType d) const;
  void same_dtype(const TensorRef& a, const TensorRef& b) const;
  void same_device(const TensorRef& a, const TensorRef& b) const;
  void on_cpu(const TensorRef& t) const;
  void contiguous(const TensorRef& t) const;
  void rows_dense(const TensorRef& t) const;
  void writable(const TensorRef& t) const;
  void same_shape(const TensorRef& a, const TensorRef& b) const;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace vita
