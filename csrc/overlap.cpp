// The drop-in overlap's C++ worker: a thread that runs fused synthesizer
// updates off the main path without ever taking the GIL (dni_fast/_overlap.py
// holds the design; docs/design.md §4).
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
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] {
      for (auto& j : pending_) if (!j->done) return false;
      return true;
    });
    std::vector<std::shared_ptr<Job>> out(pending_.begin(), pending_.end());
    pending_.clear();
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
      } catch (const std::exception& e) {
        job->error = e.what();
      }
      job->compute = nullptr;  // drop the saved tensors now
      {
        std::lock_guard<std::mutex> lock(mu_);
        job->done = true;
      }
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<std::shared_ptr<Job>> queue_, pending_;
  std::thread thread_;
  bool stop_ = false;
};

Worker& worker() {
  static Worker* w = new Worker();  // never destroyed: no join at static destruction
  return *w;
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
