// Shared plumbing for the per-family binding files: argument import, device routing, GIL release.
#pragma once

#include <pybind11/pybind11.h>

#include <utility>

#include "dlpack.h"
#include "vita/runtime.h"
#include "vita/tensor.h"

namespace vita::bind {

namespace py = pybind11;

// One op invocation: imports arguments through DLPack and keeps them alive for the call.
struct Call {
  const char* op;
  dl::Keep keep;
  Check ck;
  explicit Call(const char* op_) : op(op_), ck{op_} {}
  TensorRef arg(py::handle o, const char* name) { return dl::from_py(o, op, name, keep); }
  TensorRef opt(py::handle o, const char* name) { return dl::from_py_optional(o, op, name, keep); }
};

// Runs the CPU or CUDA body with the GIL released, according to where `t` lives.
template <class Cpu, class Cuda>
void route(const Call& c, const TensorRef& t, Cpu&& cpu, Cuda&& cuda) {
  if (t.is_cuda()) {
    if (!built_with_cuda())
      c.ck.type_error(std::string(t.name) + " is on " + device_name(t.device) + " but this build of vita_engine has no CUDA kernels");
    py::gil_scoped_release nogil;
    cuda_set_device(t.device.index);
    cuda();
  } else {
    py::gil_scoped_release nogil;
    cpu();
  }
}

void register_elementwise(py::module_& m);
void register_attention(py::module_& m);
void register_codec(py::module_& m);
void register_sampling(py::module_& m);
void register_linear(py::module_& m);

}  // namespace vita::bind

#ifdef VITA_WITH_CUDA
#define VITA_CUDA_CALL(...) __VA_ARGS__
#else
#define VITA_CUDA_CALL(...) (void)0
#endif
