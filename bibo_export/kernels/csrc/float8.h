// Eight floats as one GCC/Clang vector, lowered to whatever SIMD the target has (two NEON
// registers, one AVX register, or scalar code): the float dot products of the kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace bibo {

typedef float f8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned
  return v;
}

inline float sum8(f8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// <a, b> over n floats.
inline float dot(const float* a, const float* b, int64_t n) {
  f8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float s = sum8(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace bibo
