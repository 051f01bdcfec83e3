# What find_package(Torch) needs before it against pip's CUDA build of torch, set only where the
# project has not set it: for this project's build (CMakeLists.txt) and for a project that finds
# the installed package (mtunlearnConfig.cmake includes this file from its install prefix).
#
# mtunlearn_torch_prerequisites([torch_cmake_prefix ...]): the prefixes (torch's share/cmake, as
# torch.utils.cmake_prefix_path gives it) where nvrtc is looked for beside CMAKE_PREFIX_PATH's.
function(mtunlearn_torch_prerequisites)
  if(NOT DEFINED CUDAToolkit_ROOT AND EXISTS "/usr/local/cuda/bin/nvcc")
    set(CUDAToolkit_ROOT "/usr/local/cuda")
    set(CUDAToolkit_ROOT "/usr/local/cuda" PARENT_SCOPE)
    set(CUDA_TOOLKIT_ROOT_DIR "/usr/local/cuda" PARENT_SCOPE)
  endif()
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
    # Without a GPU to probe, torch's CMake config would fail to pick an architecture.
    set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0+PTX")
  endif()
  if(NOT CUDA_nvrtc_LIBRARY)
    # pip's torch ships nvrtc in site-packages/nvidia/..., not in the toolkit: look beside
    # torch. Also without CUDA kernels: a CUDA build of torch names it in its link interface.
    set(nvrtc_hints "")
    foreach(prefix IN LISTS CMAKE_PREFIX_PATH ARGN)
      get_filename_component(site_packages "${prefix}/../../.." ABSOLUTE)
      list(APPEND nvrtc_hints ${site_packages}/nvidia/cu13/lib
                              ${site_packages}/nvidia/cuda_nvrtc/lib)
    endforeach()
    find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
                 HINTS ${nvrtc_hints} ${CUDAToolkit_ROOT}/lib64)
  endif()
endfunction()
