# Decides VQKV_HAVE_NCCL: VQKV_NCCL=ON needs CUDA and nccl.h (the CUDA toolkit's include
# directory, NCCL_HOME, or the system's). Only the header is used at build time: vqkv_store_gpu
# loads libnccl.so.2 at run time, so binaries built with NCCL still run where it is missing.
set(VQKV_HAVE_NCCL OFF)
if(VQKV_NCCL)
  if(NOT VQKV_HAVE_CUDA)
    message(FATAL_ERROR "VQKV_NCCL=ON needs the CUDA build (VQKV_CUDA)")
  endif()
  find_path(VQKV_NCCL_INCLUDE_DIR nccl.h
    HINTS ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_HOME
    PATH_SUFFIXES include)
  if(NOT VQKV_NCCL_INCLUDE_DIR)
    message(FATAL_ERROR "VQKV_NCCL=ON but nccl.h was not found (set NCCL_HOME)")
  endif()
  set(VQKV_HAVE_NCCL ON)
endif()
