// Every schema of the mtunlearn namespace, in one place. Backend kernels register with
// TORCH_LIBRARY_IMPL next to their entries (ops/*/*.cpp); fake kernels and autograd formulas
// are registered from Python (mtunlearn_ext/ops/_registration.py).
#include <torch/library.h>

TORCH_LIBRARY(mtunlearn, m) {
  m.def("gram(Tensor x) -> Tensor");
  m.def("gram_list(Tensor[] xs, bool per_tensor=False) -> Tensor");
  m.def("inner(Tensor a, Tensor b) -> Tensor");
  m.def("inner_list(Tensor[] a_list, Tensor[] b_list, bool per_tensor=False) -> Tensor");
  m.def("gram_list_stacked(Tensor[] xs, Tensor[] ys, bool per_tensor=False) -> Tensor");
  m.def("combine(Tensor coeffs, Tensor x) -> Tensor");
  m.def("combine_(Tensor(a!) out, Tensor coeffs, Tensor x, float beta=0.0) -> ()");
  m.def("combine_list_(Tensor(a!)[] outs, Tensor coeffs, Tensor[] xs, float beta=0.0, bool per_tensor=False) -> ()");
  m.def("combine_list_from_(Tensor(a!)[] outs, Tensor[] bases, Tensor coeffs, Tensor[] xs, float beta=1.0, bool per_tensor=False) -> ()");
  m.def("ridge_solve(Tensor gram, Tensor rhs, float ridge=1e-6) -> Tensor");
  m.def("nonconflicting_dual(Tensor gram, Tensor rhs) -> Tensor");
  m.def("pcgrad_weights(Tensor gram, int seed=0) -> Tensor");
  m.def("project_out(Tensor g, Tensor basis, float ridge=1e-6) -> (Tensor, Tensor)");
  m.def("project_nonconflicting(Tensor g, Tensor r, int sign=1) -> (Tensor, Tensor)");
  m.def("pcgrad(Tensor x, int seed=0) -> (Tensor, Tensor)");
}
