// Every schema of the mtunlearn namespace, in one place. Backend kernels register with
// MTU_LIBRARY_IMPL next to their entries (ops/*/*.cpp); fake kernels and autograd formulas
// are registered from Python (mtunlearn_ext/ops/_registration.py).
#include "mtunlearn/registration.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/frontend/function_schema_parser.h>

namespace mtunlearn::registration {
namespace {

constexpr const char* kSchemas[] = {
    "gram(Tensor x) -> Tensor",
    "gram_list(Tensor[] xs, bool per_tensor=False) -> Tensor",
    "inner(Tensor a, Tensor b) -> Tensor",
    "inner_list(Tensor[] a_list, Tensor[] b_list, bool per_tensor=False) -> Tensor",
    "gram_list_stacked(Tensor[] xs, Tensor[] ys, bool per_tensor=False) -> Tensor",
    "combine(Tensor coeffs, Tensor x) -> Tensor",
    "combine_(Tensor(a!) out, Tensor coeffs, Tensor x, float beta=0.0) -> ()",
    "combine_list_(Tensor(a!)[] outs, Tensor coeffs, Tensor[] xs, float beta=0.0, "
    "bool per_tensor=False) -> ()",
    "combine_list_from_(Tensor(a!)[] outs, Tensor[] bases, Tensor coeffs, Tensor[] xs, "
    "float beta=1.0, bool per_tensor=False) -> ()",
    "ridge_solve(Tensor gram, Tensor rhs, float ridge=1e-6) -> Tensor",
    "nonconflicting_dual(Tensor gram, Tensor rhs) -> Tensor",
    "pcgrad_weights(Tensor gram, int seed=0) -> Tensor",
    "project_out(Tensor g, Tensor basis, float ridge=1e-6) -> (Tensor, Tensor)",
    "project_nonconflicting(Tensor g, Tensor r, int sign=1) -> (Tensor, Tensor)",
    "pcgrad(Tensor x, int seed=0) -> (Tensor, Tensor)",
};

void define_schemas(torch::Library& m) {
  for (const char* schema : kSchemas) m.def(schema);
}

const ConditionalInit define_once(torch::Library::DEF, &define_schemas, std::nullopt, __FILE__,
                                  __LINE__);

}  // namespace

std::vector<std::string> op_names() {
  std::vector<std::string> names;
  for (const std::string schema : kSchemas) names.push_back(schema.substr(0, schema.find('(')));
  return names;
}

bool owns_namespace() {
  static const bool owns =
      !c10::Dispatcher::singleton().findSchema({"mtunlearn::gram", ""}).has_value();
  return owns;
}

std::string schema_mismatch() {
  if (owns_namespace()) return "";
  std::string mismatch;
  for (const char* text : kSchemas) {
    const c10::FunctionSchema expected = torch::jit::parseSchema(std::string("mtunlearn::") + text);
    const auto found = c10::Dispatcher::singleton().findSchema(
        {expected.name(), expected.overload_name()});
    if (found.has_value() && found->schema() == expected) continue;
    mismatch += "\n  " + expected.name() + ": this build defines " + c10::toString(expected) +
                ", the loaded one " + (found.has_value() ? c10::toString(found->schema())
                                                         : std::string("has no such op"));
  }
  return mismatch;
}

}  // namespace mtunlearn::registration
