// Macros shared by host and device code.
#pragma once

#if defined(__CUDACC__)
#define TMOE_HD __host__ __device__ __forceinline__
#define TMOE_HOST_DEVICE __host__ __device__
#else
#define TMOE_HD inline
#define TMOE_HOST_DEVICE
#endif
