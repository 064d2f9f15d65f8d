// bmojo_core CUDA kernels: companion (placeholder; filled in by the CUDA work of issue 5).
#include "common.cuh"
