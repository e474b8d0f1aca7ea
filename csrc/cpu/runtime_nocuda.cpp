// Linked only when the module is built without CUDA.
#include "vita/runtime.h"
#include "vita/tensor.h"

namespace vita {
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_arch_list() { return ""; }
void cuda_set_device(int) { throw RuntimeError("vita_engine was built without CUDA"); }
}  // namespace vita
