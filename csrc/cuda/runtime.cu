#include <cuda_runtime.h>

#include "common.cuh"
#include "vita/runtime.h"

#ifndef VITA_CUDA_ARCHS
#define VITA_CUDA_ARCHS ""
#endif

namespace vita {
bool built_with_cuda() { return true; }

int cuda_device_count() {
  // No driver, or a driver older than the runtime, must read as "no GPU", never as a crash.
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_arch_list() { return VITA_CUDA_ARCHS; }

void cuda_set_device(int device) {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess || cur != device) VITA_CUDA_CHECK(cudaSetDevice(device));
}
}  // namespace vita
