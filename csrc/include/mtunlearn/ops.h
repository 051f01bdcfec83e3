// The C++ API of the op library (libmtunlearn_ops, the CMake build): one function per op of
// the torch.ops.mtunlearn namespace, with the schema's arguments and defaults
// (csrc/registration.cpp), called through the dispatcher, so the tensors' device picks the CPU
// or CUDA kernel and profilers and tracers see the op.
//
// Calling any of them is what keeps the library linked: its ops are registered by static
// initialisers, which a linker that drops unreferenced libraries (--as-needed, the default of
// Debian's and Ubuntu's GCC) would otherwise never run ("Could not find schema for
// mtunlearn::gram"). Forward only: the autograd formulas, fake kernels and refusals of
// backward passes are registered from Python (mtunlearn_ext.ops).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace mtunlearn::ops {

at::Tensor gram(const at::Tensor& x);
at::Tensor gram_list(at::TensorList xs, bool per_tensor = false);
at::Tensor inner(const at::Tensor& a, const at::Tensor& b);
at::Tensor inner_list(at::TensorList a_list, at::TensorList b_list, bool per_tensor = false);
at::Tensor gram_list_stacked(at::TensorList xs, at::TensorList ys, bool per_tensor = false);
at::Tensor combine(const at::Tensor& coeffs, const at::Tensor& x);
void combine_(const at::Tensor& out, const at::Tensor& coeffs, const at::Tensor& x,
              double beta = 0.0);
void combine_list_(at::TensorList outs, const at::Tensor& coeffs, at::TensorList xs,
                   double beta = 0.0, bool per_tensor = false);
void combine_list_from_(at::TensorList outs, at::TensorList bases, const at::Tensor& coeffs,
                        at::TensorList xs, double beta = 1.0, bool per_tensor = false);
at::Tensor ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, double ridge = 1e-6);
at::Tensor nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs);
at::Tensor pcgrad_weights(const at::Tensor& gram, int64_t seed = 0);
// (projected g, coefficients) as the registered ops return them.
std::tuple<at::Tensor, at::Tensor> project_out(const at::Tensor& g, const at::Tensor& basis,
                                               double ridge = 1e-6);
std::tuple<at::Tensor, at::Tensor> project_nonconflicting(const at::Tensor& g,
                                                          const at::Tensor& r, int64_t sign = 1);
std::tuple<at::Tensor, at::Tensor> pcgrad(const at::Tensor& x, int64_t seed = 0);

}  // namespace mtunlearn::ops
