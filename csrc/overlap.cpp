// The drop-in overlap's C++ worker: a thread that runs fused synthesizer
// updates off the main path without ever taking the GIL (dni_fast/_overlap.py
// holds the design; docs/design.md §4). It never drops the last reference to a
// tensor that has a Python object (the parameters, the saved inputs, the
// statistics row): releasing one takes the GIL, which stalled the worker while
// the main thread ran Python and aborted the process at exit. A finished job's
// closure goes to a graveyard that collect() empties on the calling thread.
//
// Why in C++: a Python worker thread needs the GIL between the update's calls,
// and the main thread holds it through the forward's Python code, so on the
// 2-core CI CPU a Python worker gained nothing (measured: the MLP with 5 DNIs,
// 2.2 ms of update work a step moved to the worker, 0.4 ms saved). Here the
// backward of the native step (step.cpp) enqueues the update and returns no
// parameter gradients; the worker computes them; Python collects them at a
// synchronisation point and delivers them through autograd.
#include "overlap.h"

#include <ATen/Parallel.h>

#include <pthread.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace dni_fast {
namespace overlap {
namespace {

struct Job {
  std::function<TensorVec()> compute;
  TensorVec params;
  int threads = 1;
  TensorVec grads;
  std::string error;
  bool done = false;
};

class Worker {
 public:
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.detach();  // at interpreter exit: never block on a running job
  }

  void submit(std::function<TensorVec()> compute, TensorVec params, int threads) {
    auto job = std::make_shared<Job>();
    job->compute = std::move(compute);
    job->params = std::move(params);
    job->threads = std::max(1, threads);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
      queue_.push_back(job);
      pending_.push_back(job);
    }
    cv_.notify_all();
  }

  int64_t pending() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(pending_.size());
  }

  // Waits for every job submitted so far; returns them and forgets them.
  std::vector<std::shared_ptr<Job>> collect() {
    std::vector<std::function<TensorVec()>> dead;  // destroyed here, on the calling thread, after the lock
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] {
      for (auto& j : pending_) if (!j->done) return false;
      return true;
    });
    std::vector<std::shared_ptr<Job>> out(pending_.begin(), pending_.end());
    pending_.clear();
    dead.swap(graveyard_);
    lock.unlock();
    return out;
  }

 private:
  void run() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        job = queue_.front();
        queue_.pop_front();
      }
      try {
        // Intra-op threads are per thread: this worker's own count.
        if (at::get_num_threads() != job->threads) at::set_num_threads(job->threads);
        job->grads = job->compute();
      } catch (const c10::Error& e) {
        job->error = e.what_without_backtrace();  // the message, not ten lines of C++ frames
      } catch (const std::exception& e) {
        job->error = e.what();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        graveyard_.push_back(std::move(job->compute));  // destroyed by collect(), not on this thread
        job->compute = nullptr;
        job->done = true;
        job.reset();  // pending_ still holds it: this is never the last reference
      }
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<std::shared_ptr<Job>> queue_, pending_;
  std::vector<std::function<TensorVec()>> graveyard_;
  std::thread thread_;
  bool stop_ = false;
};

Worker* g_worker = nullptr;

// After fork() the child has no worker thread, but the inherited Worker says it has one (and its mutex may
// be held by a thread that does not exist there): the child starts over with a new Worker. The old one is
// leaked, never touched again.
void reset_in_child() { g_worker = nullptr; }

Worker& worker() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, reset_in_child); });
  if (g_worker == nullptr) g_worker = new Worker();  // never destroyed: no join at static destruction
  return *g_worker;
}

}  // namespace

void submit(std::function<TensorVec()> compute, TensorVec params, int threads) {
  worker().submit(std::move(compute), std::move(params), threads);
}

int64_t pending() { return worker().pending(); }

std::vector<std::pair<TensorVec, TensorVec>> collect() {
  auto jobs = worker().collect();
  for (auto& j : jobs) {
    // All or none: the first failure is raised, and nothing of this batch is delivered.
    TORCH_CHECK(j->error.empty(), "dni_fast overlap worker: a synthesizer update failed: ", j->error);
  }
  std::vector<std::pair<TensorVec, TensorVec>> out;
  out.reserve(jobs.size());
  for (auto& j : jobs) out.emplace_back(std::move(j->params), std::move(j->grads));
  return out;
}

}  // namespace overlap
}  // namespace dni_fast
