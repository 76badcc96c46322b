// One vector register of float32 lanes, for the kernels' hand-vectorised loops.
//
// The width follows the target: 16 floats where AVX-512 is compiled in, 8 elsewhere (AVX2). GCC
// lowers a generic vector wider than the target's registers badly: on an AMD EPYC with AVX2
// only, 16-float vectors sent every broadcast and accumulator through the stack, and a one-row
// product ran at 0.7x oneDNN's speed (0.12x at 16 rows) where the same code on AVX-512 beats it.
#pragma once

#include <cstdint>
#include <cstring>

namespace goodspeed {

#if defined(__AVX512F__)
constexpr int64_t kWidth = 16;
#else
constexpr int64_t kWidth = 8;
#endif

typedef float Lanes __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kWidth * sizeof(int32_t))));
typedef uint32_t WordLanes __attribute__((vector_size(kWidth * sizeof(uint32_t))));

inline Lanes load(const float* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void store(float* p, Lanes x) { std::memcpy(p, &x, sizeof(x)); }

}  // namespace goodspeed
