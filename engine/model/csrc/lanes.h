// One vector register of float32 lanes, for the kernels' hand-vectorised loops.
//
// The width follows the target: 16 floats where AVX-512 is compiled in, 8 elsewhere (AVX2). GCC
// lowers a generic vector wider than the target's registers badly: on an AMD EPYC with AVX2
// only, 16-float vectors sent every broadcast and accumulator through the stack, and a one-row
// product ran at 0.7x oneDNN's speed (0.12x at 16 rows) where the same code on AVX-512 beats it.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// a * b + c, rounded once where the CPU has fused multiply-adds, whatever the compiler decides.
// Written `acc += a * b`, GCC fused some multiply-adds and not others depending on how a template
// instance was inlined: built for AVX2, a bfloat16 cache's attention then differed in the last
// bit from a float32 cache's of the same values after a change that only moved a switch into a
// helper. A row's results must not depend on that: a token decoded alone and among drafts runs in
// other instances (other tile sizes), and greedy speculation is exact only if they agree. (The
// products kernel still writes `+=`: its identity tests pass built for AVX-512, AVX-512 without
// bfloat16, AVX2 and SSE, and this form measured slower there.)
inline Lanes fma(float a, Lanes b, Lanes c) {
#if defined(__AVX512F__)
  return reinterpret_cast<Lanes>(_mm512_fmadd_ps(_mm512_set1_ps(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#elif defined(__FMA__) && defined(__AVX__)
  return reinterpret_cast<Lanes>(_mm256_fmadd_ps(_mm256_set1_ps(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
#else
  return a * b + c;  // no fused multiply-add on this CPU, so none to contract into either
#endif
}

// A bfloat16 is a float32's upper half (its bits, as uint16_t): widening is a shift. (GCC lowers a
// generic vector conversion of 16 of them to halves, extracts and inserts: a loop of products over
// them ran 1.3x as long.)
inline Lanes load(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<Lanes>(_mm512_slli_epi32(words, 16));
#elif defined(__AVX2__)
  const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<Lanes>(_mm256_slli_epi32(words, 16));
#else
  typedef uint16_t HalfLanes __attribute__((vector_size(kWidth * sizeof(uint16_t))));
  HalfLanes x;
  std::memcpy(&x, p, sizeof(x));
  return reinterpret_cast<Lanes>(__builtin_convertvector(x, WordLanes) << 16);
#endif
}
// A row's values as float32 lanes, for either element type.
inline Lanes load_row(const float* p) { return load(p); }
inline Lanes load_row(const c10::BFloat16* p) { return load(reinterpret_cast<const uint16_t*>(p)); }

// x rounded to bfloat16 as c10::BFloat16(float) rounds (to nearest even, NaN to 0x7FC0): the
// rounded value's bits in each word's upper half, the lower half zero. A value at a time, the
// rounding cost more than the arithmetic: silu_mul ran at 3 ns an element, slower than torch's
// unfused silu and product.
inline WordLanes bfloat16_words(Lanes x) {
  const WordLanes bits = reinterpret_cast<WordLanes>(x);
  const WordLanes rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return x != x ? WordLanes{} + 0x7FC00000u : rounded;
}

// x rounded to T and widened back, as a torch operator with a T output rounds it.
template <typename T>
inline Lanes round_lanes(Lanes x) {
  if constexpr (sizeof(T) == sizeof(float)) return x;
  else return reinterpret_cast<Lanes>(bfloat16_words(x));
}

// Stores x rounded to the row's element type.
inline void store_row(float* p, Lanes x) { store(p, x); }
inline void store_row(c10::BFloat16* p, Lanes x) {
  const WordLanes words = bfloat16_words(x) >> 16;
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(words)));
#else
  typedef uint16_t HalfLanes __attribute__((vector_size(kWidth * sizeof(uint16_t))));
  const HalfLanes halves = __builtin_convertvector(words, HalfLanes);
  std::memcpy(p, &halves, sizeof(halves));
#endif
}

// Asks for the cache lines of bytes bytes from p (a prefetch past an array's end is harmless).
inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i);
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// N vectors of a cache row or a weight's (N x kWidth elements), in the element's lane order. Floats
// come as they are. bfloat16 come 2 x kWidth at a time as kWidth 32-bit words: the words shifted up
// are the even elements, the words masked the odd ones, two operations for two vectors (widening
// takes two a vector); so vector 2i holds the even elements of the i-th 2 x kWidth, 2i + 1 the odd.
template <int N>
inline void load_lanes(const float* p, Lanes* x) {
  for (int i = 0; i < N; ++i) x[i] = load(p + i * kWidth);
}
template <int N>
inline void load_lanes(const uint16_t* p, Lanes* x) {
  static_assert(N % 2 == 0, "bfloat16 lanes come in pairs of vectors");
  for (int i = 0; i < N / 2; ++i) {
    WordLanes words;
    std::memcpy(&words, p + 2 * i * kWidth, sizeof(words));
    x[2 * i] = reinterpret_cast<Lanes>(words << 16);
    x[2 * i + 1] = reinterpret_cast<Lanes>(words & 0xFFFF0000u);
  }
}

// Float results kept in T's lane order (products with vectors from load_lanes<N>(const T*)), to
// and from memory order: for float, as they are; for bfloat16, each pair of vectors interleaved.
template <typename T, int N>
inline void store_in_order(float* p, const Lanes* x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    for (int i = 0; i < N; ++i) store(p + i * kWidth, x[i]);
  } else {
    for (int i = 0; i < N; i += 2) {
#if defined(__AVX512F__)
      store(p + i * kWidth, __builtin_shufflevector(x[i], x[i + 1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
      store(p + (i + 1) * kWidth,
            __builtin_shufflevector(x[i], x[i + 1], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
#else
      store(p + i * kWidth, __builtin_shufflevector(x[i], x[i + 1], 0, 8, 1, 9, 2, 10, 3, 11));
      store(p + (i + 1) * kWidth, __builtin_shufflevector(x[i], x[i + 1], 4, 12, 5, 13, 6, 14, 7, 15));
#endif
    }
  }
}
template <typename T, int N>
inline void load_in_lane_order(const float* p, Lanes* x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    for (int i = 0; i < N; ++i) x[i] = load(p + i * kWidth);
  } else {
    for (int i = 0; i < N; i += 2) {
      const Lanes lo = load(p + i * kWidth), hi = load(p + (i + 1) * kWidth);
#if defined(__AVX512F__)
      x[i] = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      x[i + 1] = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
      x[i] = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
      x[i + 1] = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
    }
  }
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
