// The drop-in overlap's C++ worker thread (overlap.cpp).
#pragma once

#include "synth.h"

#include <functional>
#include <utility>
#include <vector>

namespace dni_fast {
namespace overlap {

// Queue compute() -> one gradient per entry of params, to run on the worker
// with `threads` intra-op threads.
void submit(std::function<TensorVec()> compute, TensorVec params, int threads);
// Jobs submitted and not yet collected.
int64_t pending();
// Wait for every submitted job; return (params, grads) per job in submission
// order. Raises the first job's error (and drops the batch) if one failed.
std::vector<std::pair<TensorVec, TensorVec>> collect();

}  // namespace overlap
}  // namespace dni_fast
