// The Python module mtunlearn_ext._C. Loading it loads the shared library that carries the
// TORCH_LIBRARY registrations; build_info() says how it was built. Kept alone in its file:
// pybind11 headers are expensive and nothing else needs them.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "mtunlearn/cpu_isa.h"
#include "mtunlearn/registration.h"

#ifndef MTU_TORCH_VERSION
#define MTU_TORCH_VERSION "unknown"
#endif
#ifndef MTU_CUDA_ARCHS
#define MTU_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = MTU_TORCH_VERSION;
#ifdef MTU_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = MTU_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["parallel_backend"] = at::get_parallel_info();
  info["threads"] = at::get_num_threads();
  info["compiler"] = compiler();
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

py::dict cpu_isa_info() {
  namespace isa = mtunlearn::cpu_isa;
  py::dict info;
  info["detected"] = isa::name(isa::detected());
  info["limit"] = isa::name(isa::limit());
  info["active"] = isa::name(isa::active());
  return info;
}

void set_cpu_isa_limit(const std::string& name) {
  mtunlearn::cpu_isa::Isa isa;
  if (!mtunlearn::cpu_isa::parse(name.c_str(), &isa))
    throw std::invalid_argument("set_cpu_isa: `isa` must be 'avx512', 'avx2' or 'baseline', got '" +
                                name + "'");
  mtunlearn::cpu_isa::set_limit(isa);
}

py::dict registration_info() {
  py::dict info;
  info["owner"] = mtunlearn::registration::owns_namespace();
  info["schema_mismatch"] = mtunlearn::registration::schema_mismatch();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtunlearn_ext compiled ops (registered as torch.ops.mtunlearn)";
  m.def("build_info", &build_info, "How the extension was built: torch, CUDA archs, threads, compiler");
  m.def("cpu_isa", &cpu_isa_info, "The CPU kernels' instruction set: detected, limit, active");
  // The torch whose C++ ABI the library was compiled against, read at import; build_info()
  // would start torch's thread pools there (after which interop threads cannot be set).
  m.attr("torch_version") = MTU_TORCH_VERSION;
  m.def("registration", &registration_info,
        "Whether this module registered the mtunlearn ops (owner) or found them registered by "
        "another build (the CMake library), and any schema that build defines otherwise");
  m.def("set_cpu_isa_limit", &set_cpu_isa_limit, py::arg("isa"),
        "Cap the CPU kernels' instruction set ('avx512', 'avx2' or 'baseline')");
}
