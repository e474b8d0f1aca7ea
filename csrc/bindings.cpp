// The pybind11 module vita_engine._C: every kernel family registers its functions here.
// Tensors arrive through DLPack (csrc/bind/dlpack.cpp); nothing here knows about torch.
#include <pybind11/pybind11.h>

#include "bind/common.h"
#include "cpu/cpu_isa.h"
#include "vita/parallel.h"
#include "vita/runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vita-engine kernels (CPU always, CUDA when built with it); tensors via DLPack";

  py::register_exception<vita::ValueError>(m, "VitaValueError", PyExc_ValueError);
  py::register_exception<vita::TypeError>(m, "VitaTypeError", PyExc_TypeError);
  py::register_exception<vita::RuntimeError>(m, "VitaRuntimeError", PyExc_RuntimeError);

  m.def("built_with_cuda", &vita::built_with_cuda);
  m.def("cuda_device_count", &vita::cuda_device_count);
  m.def("cuda_arch_list", &vita::cuda_arch_list);
  m.def("num_threads", &vita::num_threads, "threads used by the CPU kernels");
  m.def("set_num_threads", &vita::set_num_threads, py::arg("n"));
  m.def("threadpool_backend", &vita::threadpool_backend,
        "'omp' when the CPU kernels run on the host's OpenMP team (torch's), 'own' on the extension's pool");
  m.def("cpu_isa", [] { return std::string(vita::cpu::isa_name(vita::cpu::cpu_isa())); },
        "the CPU code path the kernels take now: avx2, avx512, avx512bf16 or amx (VITA_CPU_ISA caps it)");

  vita::bind::register_elementwise(m);
  vita::bind::register_codec(m);
  vita::bind::register_sampling(m);
  vita::bind::register_attention(m);
  vita::bind::register_linear(m);
}
