// The OpenMP runtime that the host process already loaded (torch's bundled libgomp), found at run
// time. The CPU kernels run their parallel loops on its thread team when it is there: torch's
// threads spin for a while after each torch op, so a pool of our own would fight them for the cores
// and pay a wake-up on every call. The extension never links an OpenMP runtime itself.
#pragma once

namespace vita::host_omp {

struct Runtime {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);  // GOMP_parallel
  int (*in_parallel)();                                                                   // omp_in_parallel
};

// The loaded runtime, or nullptr when none is loaded (the process never imported torch) or
// VITA_THREADPOOL=own. Looked up again on each call until found, so importing torch after the
// extension still binds it; cheap once found.
const Runtime* get();

// "omp" (the host's team) or "own" (the extension's pool): what the next parallel loop will use.
const char* backend();

}  // namespace vita::host_omp
