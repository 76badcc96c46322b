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

// A bfloat16 is a float32's upper half (its bits, as uint16_t): widening is a shift.
typedef uint16_t HalfLanes __attribute__((vector_size(kWidth * sizeof(uint16_t))));
inline Lanes load(const uint16_t* p) {
  HalfLanes x;
  std::memcpy(&x, p, sizeof(x));
  return reinterpret_cast<Lanes>(__builtin_convertvector(x, WordLanes) << 16);
}
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// exp(x), a vector at a time: 2^(x log2 e) split into an integer power (exponent bits) and a
// degree-6 polynomial of the fraction. Relative error about 2e-7, like float32's own exp; x is
// clamped to [-87, 88], where both the power and the result stay normal floats.
inline Lanes exp_lanes(Lanes x) {
  const Lanes lowest = Lanes{} - 87.0f, highest = Lanes{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const Lanes t = x * 1.4426950408889634f;
  IntLanes whole = __builtin_convertvector(t, IntLanes);  // rounds towards zero ...
  whole += (__builtin_convertvector(whole, Lanes) > t);   // ... so one less where that was up (true is -1)
  const Lanes f = t - __builtin_convertvector(whole, Lanes);
  Lanes p = Lanes{} + 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184375e-3f;
  p = p * f + 5.5503324e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314720e-1f;
  p = p * f + 1.0f;
  return p * reinterpret_cast<Lanes>((whole + 127) << 23);
}

}  // namespace goodspeed
