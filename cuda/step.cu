// bmojo_core CUDA kernels: step (placeholder; filled in by the CUDA work of issue 5).
#include "common.cuh"
