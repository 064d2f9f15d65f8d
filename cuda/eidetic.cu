// bmojo_core CUDA kernels: eidetic (placeholder; filled in by the CUDA work of issue 5).
#include "common.cuh"
