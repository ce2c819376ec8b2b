// Shared by the CPU kernels: per-ISA cloning, storage-dtype -> fp32 conversion, 8-float vectors.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// The hot loops are plain C++ written so GCC/Clang auto-vectorise them. We may not use
// -march=native (wheels run on other CPUs), so on x86-64 the hot functions are cloned for
// AVX2+FMA and AVX-512 and picked at load time (ifunc); everything else stays baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define LVR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LVR_CLONES
#endif

namespace lvr_engine {

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) {
  // bf16 is the top half of an fp32; the shift is exact and vectorises (c10's operator may not).
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_f(c10::Half x) { return static_cast<float>(x); }

// 8-float vectors via GCC vector extensions: each target clone lowers them to its own registers
// (two SSE ops on baseline x86-64, one AVX op on v3/v4), so no intrinsics per ISA are needed.
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
inline v8 ld8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void st8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline float hsum8(v8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

}  // namespace lvr_engine
