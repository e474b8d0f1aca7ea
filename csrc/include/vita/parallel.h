// A small persistent thread pool for the CPU kernels. We avoid OpenMP so the wheel does not
// drag in a second OpenMP runtime beside torch's bundled one.
#pragma once

#include <cstdint>
#include <functional>

namespace vita {

int num_threads();
void set_num_threads(int n);
// "omp": parallel loops run on the host process's OpenMP team (torch's); "own": on the extension's pool.
const char* threadpool_backend();

// Runs fn(begin, end) over [0, n) split into chunks of at least `grain` items, on the pool and
// the calling thread. Re-entrant calls (from a worker, or while another thread holds the pool)
// run inline on the caller.
void parallel_for_impl(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

template <class F>
inline void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (n <= grain || num_threads() == 1) {
    fn(int64_t(0), n);
    return;
  }
  parallel_for_impl(n, grain, std::function<void(int64_t, int64_t)>(fn));
}

}  // namespace vita
