// The CMake library only (no Python module): an Autograd kernel for every op, so that a C++
// caller differentiating through one gets an error at backward() naming the op, not
// PyTorch's default of a warning and no gradient. The Python package registers the autograd
// formulas and refusals itself (mtunlearn_ext/ops/_registration.py), so it does not build this.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "mtunlearn/registration.h"

namespace mtunlearn {

MTU_LIBRARY_IMPL(Autograd, m) {
  for (const std::string& op : registration::op_names())
    m.impl(op.c_str(), torch::autograd::autogradNotImplementedFallback());
}

}  // namespace mtunlearn
