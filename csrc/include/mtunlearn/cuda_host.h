// Host side of the CUDA backend (device guard, current stream, metadata upload, workspace),
// compiled only when the extension is built with CUDA (MTU_WITH_CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "mtunlearn/kernels.h"

namespace mtunlearn {
namespace cuda_host {

// out: [num_outputs, m, k] accumulation-type tensor on the device; overwritten.
void reduce(ScalarKind kind, const std::vector<ReduceSegment>& segments, int64_t m, int64_t k,
            bool symmetric, const at::Tensor& out);

// coeffs: contiguous accumulation-type tensor [num_coeffs, m, k] on the device.
void combine(ScalarKind kind, const std::vector<CombineSegment>& segments, int64_t m, int64_t k,
             const at::Tensor& coeffs, double beta);

// Solvers on contiguous accumulation-type tensors (one thread per problem).
void ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, const at::Tensor& out,
                 double ridge, double pivot_floor);
void nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs, const at::Tensor& out,
                         double pivot_floor);
void pcgrad_weights(const at::Tensor& gram, const at::Tensor& out, int64_t seed);

}  // namespace cuda_host
}  // namespace mtunlearn
