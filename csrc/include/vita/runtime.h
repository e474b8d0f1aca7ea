// Backend facts the Python layer asks for.
#pragma once
#include <string>

namespace vita {
bool built_with_cuda();
// 0 when built without CUDA, when there is no driver, or when cudaGetDeviceCount fails.
int cuda_device_count();
std::string cuda_arch_list();  // architectures compiled into this module, e.g. "80;90a"
// Make `device` current for this thread's next launches (CUDA only).
void cuda_set_device(int device);
}  // namespace vita
