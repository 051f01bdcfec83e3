// Registration of the mtunlearn namespace that lets two builds of these ops share a process:
// the Python module (mtunlearn_ext._C) and the CMake library (libmtunlearn_ops.so) each carry
// the schemas and kernels, and torch aborts the process (an exception from a static
// initialiser) when a namespace is defined twice. The library loaded first registers; the
// other registers nothing and its callers reach the first one's kernels by name.
#pragma once

#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace mtunlearn::registration {

// Whether this shared library registers the namespace, decided once, before its first
// registration: false when another build defined mtunlearn::gram first. Hidden, so that each
// library answers for itself (a default-visibility symbol would bind the second library's
// calls to the first's answer).
__attribute__((visibility("hidden"))) bool owns_namespace();

// The ops' names without the namespace ("gram", ...), in the schemas' order.
__attribute__((visibility("hidden"))) std::vector<std::string> op_names();

// Empty when this library registered the namespace or the one that did defines the same
// schemas; otherwise names each op whose schema differs (another version of the ops).
__attribute__((visibility("hidden"))) std::string schema_mismatch();

// torch::detail::TorchLibraryInit, run only by the library that owns the namespace.
class ConditionalInit final {
 public:
  using InitFn = void(torch::Library&);
  ConditionalInit(torch::Library::Kind kind, InitFn* init, std::optional<c10::DispatchKey> key,
                  const char* file, uint32_t line) {
    if (!owns_namespace()) return;
    library_.emplace(kind, "mtunlearn", key, file, line);
    init(*library_);
  }

 private:
  std::optional<torch::Library> library_;  // deregisters on unload, as TORCH_LIBRARY's does
};

}  // namespace mtunlearn::registration

// TORCH_LIBRARY_IMPL(mtunlearn, k, m) for a library that may not own the namespace.
#define MTU_LIBRARY_IMPL(k, m) MTU_LIBRARY_IMPL_UID(k, m, C10_UID)
#define MTU_LIBRARY_IMPL_UID(k, m, uid)                                                        \
  static void C10_CONCATENATE(mtu_library_impl_##k##_, uid)(torch::Library&);                  \
  static const ::mtunlearn::registration::ConditionalInit C10_CONCATENATE(                     \
      mtu_library_impl_init_##k##_, uid)(torch::Library::IMPL,                                 \
                                         &C10_CONCATENATE(mtu_library_impl_##k##_, uid),       \
                                         std::make_optional(c10::DispatchKey::k), __FILE__,    \
                                         __LINE__);                                            \
  void C10_CONCATENATE(mtu_library_impl_##k##_, uid)(torch::Library & m)
