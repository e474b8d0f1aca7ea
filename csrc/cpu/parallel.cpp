#include "vita/parallel.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "host_openmp.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VITA_CPU_RELAX() _mm_pause()
#else
#define VITA_CPU_RELAX() ((void)0)
#endif

namespace vita {
namespace {

thread_local bool t_in_pool = false;

// Waking a thread that sleeps on a condition variable costs tens of microseconds on a virtual
// machine (the idle vCPU must be woken by an interrupt): as long as a whole kernel call of a decode
// step. So a waiting thread first spins for a short while, yielding to anything else runnable, and
// only then sleeps; torch's OpenMP threads do the same. VITA_SPIN_US sets the while (0: never spin).
int64_t spin_us() {
  static const int64_t us = [] {
    const char* e = std::getenv("VITA_SPIN_US");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(200);
  }();
  return us;
}

// Spins until done() or the budget is spent; true if done.
template <class Done>
bool spin_until(Done done) {
  const int64_t budget = spin_us();
  if (budget == 0) return done();
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(budget);
  for (;;) {
    for (int i = 0; i < 32; ++i) {
      if (done()) return true;
      VITA_CPU_RELAX();
    }
    if (std::chrono::steady_clock::now() >= end) return done();
    sched_yield();
  }
}

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return nthreads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> run(run_mu_);
    stop();
    nthreads_ = std::max(1, n);
    quit_ = false;
    for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this] { loop(); });
  }

  bool try_run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (!run.owns_lock()) return false;
    int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(nthreads_) * 4);
    bool wake;
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      chunk_ = (n + chunks - 1) / chunks;
      next_.store(0);
      generation_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    work();
    // Wait only for workers that joined this call, not for every worker to wake up: on a loaded
    // machine a sleeping worker may be scheduled milliseconds later, long after the caller has
    // done all the chunks itself. No worker can join once the chunks are gone (see loop()).
    spin_until([this] { return active_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_.load() == 0; });
    fn_ = nullptr;
    return true;
  }

 private:
  void work() {
    bool saved = t_in_pool;
    t_in_pool = true;
    for (;;) {
      int64_t b = next_.fetch_add(chunk_);
      if (b >= n_) break;
      (*fn_)(b, std::min(n_, b + chunk_));
    }
    t_in_pool = saved;
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        spin_until([&] { return generation_.load(std::memory_order_acquire) != seen || quit_.load(std::memory_order_relaxed); });
        std::unique_lock<std::mutex> lk(mu_);
        ++sleepers_;
        cv_.wait(lk, [&] { return quit_ || generation_.load() != seen; });
        --sleepers_;
        if (quit_) return;
        seen = generation_.load();
        // Join under the lock and only while chunks remain, so the caller's wait for active_ == 0
        // covers every worker that can still touch fn_.
        if (fn_ == nullptr || next_.load() >= n_) continue;
        ++active_;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  int nthreads_ = 1;
  std::atomic<bool> quit_{false};
  std::atomic<uint64_t> generation_{0};  // written under mu_, read by spinning workers without it
  std::atomic<int> active_{0};
  int sleepers_ = 0;  // workers inside cv_.wait (under mu_): the caller notifies only if one is
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
};

int default_threads() {
  if (const char* e = std::getenv("VITA_NUM_THREADS")) {
    int v = std::atoi(e);
    if (v > 0) return v;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? int(hc) : 1;
}

Pool& pool() {
  static Pool* p = new Pool(default_threads());  // never destroyed: workers may outlive static teardown
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n); }

namespace {

// One parallel loop on the host's OpenMP team: the same dynamic chunking as the own pool.
struct TeamLoop {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // the first exception, rethrown on the caller (never across OpenMP)

  static void run(void* p) {
    auto* L = static_cast<TeamLoop*>(p);
    const bool saved = t_in_pool;
    t_in_pool = true;
    try {
      for (;;) {
        const int64_t b = L->next.fetch_add(L->chunk);
        if (b >= L->n || L->failed.load(std::memory_order_relaxed)) break;
        (*L->fn)(b, std::min(L->n, b + L->chunk));
      }
    } catch (...) {
      if (!L->failed.exchange(true)) L->error = std::current_exception();
    }
    t_in_pool = saved;
  }
};

bool run_on_host_team(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  const host_omp::Runtime* rt = host_omp::get();
  if (!rt || rt->in_parallel()) return false;  // inside a torch op's region: the caller runs it inline
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(num_threads()) * 4);
  TeamLoop L;
  L.fn = &fn;
  L.n = n;
  L.chunk = (n + chunks - 1) / chunks;
  rt->parallel(&TeamLoop::run, &L, unsigned(std::min<int64_t>(chunks, num_threads())), 0);
  if (L.error) std::rethrow_exception(L.error);
  return true;
}

}  // namespace

void parallel_for_impl(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (t_in_pool) return fn(0, n);
  if (run_on_host_team(n, grain, fn)) return;
  if (!pool().try_run(n, grain, fn)) fn(0, n);
}

const char* threadpool_backend() { return host_omp::backend(); }

}  // namespace vita
