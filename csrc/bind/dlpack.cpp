#include "dlpack.h"

#include <string>

namespace py = pybind11;

namespace vita::dl {
namespace {

DType map_dtype(const DLDataType& t) {
  if (t.lanes != 1) return DType::kOther;
  switch (t.code) {
    case kDLFloat:
      return t.bits == 32 ? DType::kFloat32 : t.bits == 16 ? DType::kFloat16 : t.bits == 64 ? DType::kFloat64 : DType::kOther;
    case kDLBfloat:
      return t.bits == 16 ? DType::kBFloat16 : DType::kOther;
    case kDLInt:
      return t.bits == 32 ? DType::kInt32 : t.bits == 64 ? DType::kInt64 : t.bits == 16 ? DType::kInt16 : t.bits == 8 ? DType::kInt8 : DType::kOther;
    case kDLUInt:
      return t.bits == 8 ? DType::kUInt8 : DType::kOther;
    case kDLBool:
      return DType::kBool;
    default:
      return DType::kOther;
  }
}

TensorRef from_dltensor(const DLTensor& t, bool readonly, const char* op, const char* name) {
  Check ck{op};
  TensorRef r;
  r.name = name;
  r.readonly = readonly;
  if (t.ndim > kMaxDims || t.ndim < 0)
    ck.value_error(std::string(name) + " has " + std::to_string(t.ndim) + " dims; at most " + std::to_string(kMaxDims) + " are supported");
  r.ndim = t.ndim;
  r.dtype = map_dtype(t.dtype);
  if (r.dtype == DType::kOther)
    ck.type_error(std::string(name) + " has an unsupported DLPack dtype (code " + std::to_string(t.dtype.code) + ", bits " +
                  std::to_string(t.dtype.bits) + ", lanes " + std::to_string(t.dtype.lanes) + ")");
  switch (t.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      r.device = {DeviceType::kCPU, 0};
      break;
    case kDLCUDA:
    case kDLCUDAManaged:
      r.device = {DeviceType::kCUDA, t.device.device_id};
      break;
    default:
      ck.type_error(std::string(name) + " lives on an unsupported device (DLPack device type " +
                    std::to_string(t.device.device_type) + "); expected CPU or CUDA");
  }
  r.data = static_cast<char*>(t.data) + t.byte_offset;
  int64_t expect = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    r.shape[i] = t.shape[i];
    r.strides[i] = t.strides ? t.strides[i] : expect;
    expect *= t.shape[i];
  }
  return r;
}

struct Names {
  py::str dlpack{"__dlpack__"};
  py::str dlpack_device{"__dlpack_device__"};
  py::tuple max_version = py::make_tuple(1, 1);
};
Names& names() {
  static Names* n = new Names();  // leaked on purpose: must outlive interpreter teardown order
  return *n;
}

}  // namespace

TensorRef from_py(py::handle obj, const char* op, const char* name, Keep& keep) {
  Check ck{op};
  if (obj.is_none()) ck.type_error(std::string(name) + " is required, got None");
  py::object cap;
  if (PyCapsule_CheckExact(obj.ptr())) {
    cap = py::reinterpret_borrow<py::object>(obj);
  } else {
    Names& n = names();
    if (!py::hasattr(obj, n.dlpack))
      ck.type_error(std::string(name) + " must be a tensor or array supporting DLPack (__dlpack__), got " +
                    std::string(py::str(py::type::of(obj).attr("__name__"))));
    try {
      py::object dev = obj.attr(n.dlpack_device)();
      int dev_type = dev.cast<py::tuple>()[0].cast<int>();
      py::dict kw;
      kw["max_version"] = n.max_version;
      // Our kernels run on the caller's stream, which is the producer's current stream: no sync needed.
      if (dev_type == kDLCUDA || dev_type == kDLCUDAManaged) kw["stream"] = -1;
      try {
        cap = obj.attr(n.dlpack)(**kw);
      } catch (py::error_already_set& e) {
        if (!e.matches(PyExc_TypeError)) throw;
        kw.attr("pop")("max_version");  // producer predates DLPack 1.0: legacy capsule
        cap = obj.attr(n.dlpack)(**kw);
      }
    } catch (py::error_already_set& e) {
      ck.type_error(std::string(name) + " could not be exported through DLPack: " + e.what());
    }
  }
  keep.objs.push_back(cap);
  const char* cname = PyCapsule_GetName(cap.ptr());
  std::string cn = cname ? cname : "";
  if (cn == "dltensor_versioned") {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap.ptr(), cname));
    if (!m) throw py::error_already_set();
    if (m->version.major != 1)
      ck.type_error(std::string(name) + " uses DLPack major version " + std::to_string(m->version.major) + "; expected 1");
    return from_dltensor(m->dl_tensor, (m->flags & kFlagReadOnly) != 0, op, name);
  }
  if (cn == "dltensor") {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), cname));
    if (!m) throw py::error_already_set();
    return from_dltensor(m->dl_tensor, false, op, name);
  }
  ck.type_error(std::string(name) + " is a capsule named '" + cn + "', expected an unconsumed DLPack capsule");
}

TensorRef from_py_optional(py::handle obj, const char* op, const char* name, Keep& keep) {
  if (obj.is_none()) {
    TensorRef r;
    r.name = name;
    r.ndim = -1;
    return r;
  }
  return from_py(obj, op, name, keep);
}

}  // namespace vita::dl
