// A persistent pool for the CPU path. Starting a std::thread per pass costs tens of
// microseconds, so passes under a few million elements ran on one core; parked workers wake
// in a few microseconds, which lets a 1M-param step use every core.
#pragma once
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace fused_opt {

class ThreadPool {
 public:
  // The process's pool. A child of fork() has none of its parent's threads (DataLoader
  // workers fork): it gets a fresh pool, and the parent's, whose lock may have been held
  // mid-fork, is left untouched (leaked, never destroyed: workers may still wait on it).
  static ThreadPool& instance() {
    static bool registered = (pthread_atfork(nullptr, nullptr, [] { current() = new ThreadPool(); }), true);
    (void)registered;
    return *current();
  }

  // Read once: std::thread::hardware_concurrency() asks the kernel (6 us a call on a 2-core x86-64 VM,
  // three times per step, more than the kernels of a small step took).
  static int64_t hardware_threads() {
    static const int64_t threads = std::max(1u, std::thread::hardware_concurrency());
    return threads;
  }

  // The most threads a pass uses: torch.set_num_threads's setting, which the Python side passes
  // on (torchrun sets OMP_NUM_THREADS=1 when a machine runs several ranks: a pool of the
  // hardware's size in every rank would oversubscribe the cores), at most the hardware's.
  static std::atomic<int64_t>& thread_limit() {
    static std::atomic<int64_t> limit{hardware_threads()};
    return limit;
  }
  static int64_t max_threads() {
    return std::min(hardware_threads(), thread_limit().load(std::memory_order_relaxed));
  }
  // fn(t) for every t in [0, tasks), the calling thread taking its share; returns when all ran.
  void run(int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_run_at_a_time(run_lock_);
    std::unique_lock<std::mutex> lock(lock_);
    const int64_t wanted = std::min(tasks, max_threads()) - 1;
    while (int64_t(started_) < wanted) {
      std::thread(&ThreadPool::work, this).detach();  // detached: exit never waits on a parked worker
      ++started_;
    }
    job_ = &fn;
    next_ = 0;
    tasks_ = pending_ = tasks;
    ++generation_;
    work_ready_.notify_all();
    drain(lock);
    all_done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  static ThreadPool*& current() {
    static ThreadPool* pool = new ThreadPool();
    return pool;
  }

  // Takes tasks until none are left; called with the lock held, returns with it held.
  void drain(std::unique_lock<std::mutex>& lock) {
    while (next_ < tasks_) {
      const int64_t t = next_++;
      const auto* job = job_;
      lock.unlock();
      (*job)(t);
      lock.lock();
      if (--pending_ == 0) all_done_.notify_all();
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(lock_);
    uint64_t seen = generation_;
    for (;;) {
      work_ready_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      drain(lock);
    }
  }

  std::mutex run_lock_, lock_;
  std::condition_variable work_ready_, all_done_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t next_ = 0, tasks_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  size_t started_ = 0;
};

}  // namespace fused_opt
