#include "host_openmp.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace vita::host_omp {
namespace {

bool wanted() {
  const char* e = std::getenv("VITA_THREADPOOL");
  return !(e && std::strcmp(e, "own") == 0);
}

// Looks for an already-loaded GNU or LLVM/Intel OpenMP runtime (the latter two export the GOMP
// entry points too) and binds it with RTLD_NOLOAD, so nothing new is ever loaded.
int visit(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libgomp", 7) != 0 && std::strncmp(base, "libiomp", 7) != 0 && std::strncmp(base, "libomp", 6) != 0)
    return 0;
  void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
  if (!h) return 0;
  Runtime rt{};
  rt.parallel = reinterpret_cast<decltype(rt.parallel)>(dlsym(h, "GOMP_parallel"));
  rt.in_parallel = reinterpret_cast<decltype(rt.in_parallel)>(dlsym(h, "omp_in_parallel"));
  if (!rt.parallel || !rt.in_parallel) return 0;  // the handle stays open: harmless
  *static_cast<Runtime*>(out) = rt;
  return 1;
}

std::atomic<const Runtime*> g_rt{nullptr};
std::mutex g_mu;
Runtime g_storage;

// GNU OpenMP is not fork-safe: in a child forked after the parent ran a parallel region, the next
// region waits forever for the parent's team. So a forked child never uses the host's team (the own
// pool then runs every chunk on the caller: its workers stayed in the parent).
std::atomic<bool> g_forked{false};
const bool g_atfork = [] {
  pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
  return true;
}();

}  // namespace

const Runtime* get() {
  if (g_forked.load(std::memory_order_relaxed)) return nullptr;
  if (const Runtime* rt = g_rt.load(std::memory_order_acquire)) return rt;
  static const bool want = wanted();
  if (!want) return nullptr;
  std::lock_guard<std::mutex> lk(g_mu);
  if (const Runtime* rt = g_rt.load(std::memory_order_relaxed)) return rt;
  // Until a runtime turns up (a process that uses the extension with numpy only), scan the loaded
  // libraries on the first call and then every 1024th, not on every kernel call.
  static unsigned misses = 0;
  if (misses++ % 1024 != 0) return nullptr;
  Runtime found{};
  if (dl_iterate_phdr(visit, &found) == 0) return nullptr;
  g_storage = found;
  g_rt.store(&g_storage, std::memory_order_release);
  return &g_storage;
}

const char* backend() { return get() ? "omp" : "own"; }

}  // namespace vita::host_omp
