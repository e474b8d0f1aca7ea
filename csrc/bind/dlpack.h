// DLPack consumer: turns any object with __dlpack__ (or a raw DLPack capsule) into a
// vita::TensorRef without copying. The ABI structs below are declared from the DLPack
// specification (v1.x versioned and the legacy unversioned form).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "vita/tensor.h"

namespace vita::dl {

extern "C" {
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
enum DLDeviceType : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLCUDAManaged = 13,
};
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
enum DLDataTypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // may be null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};
}
constexpr uint64_t kFlagReadOnly = 1ull << 0;

// Keeps the capsules of one call alive: the producer's capsule destructor releases the
// tensor (we never rename the capsule, so ownership stays with it). Must die with the GIL held.
struct Keep {
  std::vector<pybind11::object> objs;
};

// name: the argument name used in error messages. op: the op name.
TensorRef from_py(pybind11::handle obj, const char* op, const char* name, Keep& keep);
// Same, but None -> returns a TensorRef with data == nullptr and ndim == -1.
TensorRef from_py_optional(pybind11::handle obj, const char* op, const char* name, Keep& keep);

}  // namespace vita::dl
