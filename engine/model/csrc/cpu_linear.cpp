// y = x @ w.T (+ bias) for a few rows of x, on the CPU, float32 or bfloat16 weights
// (engine/model/linear.py says when it is used and why).
//
// A decode step's products are matrix-vector products: bound by reading the weight once. This
// reads each weight row as one contiguous stream (one row after another through the matrix),
// which the hardware prefetcher follows at the memory's speed; MKL's and oneDNN's single-row
// products reach about half of it on the CPUs measured. Every output is computed the same way
// whatever the number of rows: four partial sums over K, lane by lane in order, added in a fixed
// tree, then the tail of K, then the bias.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float Lanes __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register
typedef float Lanes8 __attribute__((vector_size(32)));
typedef float Lanes4 __attribute__((vector_size(16)));
typedef uint16_t HalfLanes __attribute__((vector_size(32)));
typedef uint32_t WordLanes __attribute__((vector_size(64)));
constexpr int64_t kWidth = 16;
constexpr int kParts = 4;     // partial sums per output: independent chains for the FMA units
constexpr int kMaxRows = 4;   // rows of x per pass over a weight row (their accumulators fill the registers)
constexpr int64_t kGrain = 64;  // weight rows per parallel task

inline Lanes load(const float* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
// bfloat16 is the top half of a float32: widen and shift
inline Lanes load(const c10::BFloat16* p) {
  HalfLanes half;
  std::memcpy(&half, p, sizeof(half));
  return reinterpret_cast<Lanes>(__builtin_convertvector(half, WordLanes) << 16);
}

inline float sum_lanes(Lanes v) {
  const Lanes8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Lanes4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// out[r] = x_r . w for R rows of x (float32, K apart) and one weight row.
template <int R, typename W>
void dot_rows(const float* x, int64_t K, const W* w, float* out) {
  Lanes acc[R][kParts] = {};
  int64_t k = 0;
  for (; k + kParts * kWidth <= K; k += kParts * kWidth) {
    Lanes wv[kParts];
    for (int p = 0; p < kParts; ++p) wv[p] = load(w + k + p * kWidth);
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < kParts; ++p) acc[r][p] += load(x + r * K + k + p * kWidth) * wv[p];
  }
  for (int p = 0; k + kWidth <= K; k += kWidth, ++p) {
    const Lanes wv = load(w + k);
    for (int r = 0; r < R; ++r) acc[r][p] += load(x + r * K + k) * wv;
  }
  for (int r = 0; r < R; ++r) {
    float sum = sum_lanes((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]));
    for (int64_t t = k; t < K; ++t) sum += x[r * K + t] * static_cast<float>(w[t]);
    out[r] = sum;
  }
}

template <typename W>
void dot_rows(int num_rows, const float* x, int64_t K, const W* w, float* out) {
  switch (num_rows) {
    case 1: return dot_rows<1>(x, K, w, out);
    case 2: return dot_rows<2>(x, K, w, out);
    case 3: return dot_rows<3>(x, K, w, out);
    default: return dot_rows<4>(x, K, w, out);
  }
}

template <typename T>
void row_linear(const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  std::vector<float> xf(x, x + M * K);  // float32 rows, read once per weight row
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    float out[kMaxRows];
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? static_cast<float>(bias[n]) : 0.0f;
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const int num_rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m));
        dot_rows(num_rows, xf.data() + m * K, K, w + n * K, out);
        for (int r = 0; r < num_rows; ++r) y[(m + r) * N + n] = static_cast<T>(out[r] + b);
      }
    }
  });
}

at::Tensor row_linear_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "row_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "row_linear: x and w of one dtype");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!bc.defined() || (bc.numel() == w.size(0) && bc.scalar_type() == w.scalar_type()),
              "row_linear: bias [N] of w's dtype");
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    row_linear(xc.data_ptr<float>(), wc.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr,
               y.data_ptr<float>(), M, K, N);
  } else if (x.scalar_type() == at::kBFloat16) {
    using BF16 = c10::BFloat16;
    row_linear(xc.data_ptr<BF16>(), wc.data_ptr<BF16>(), bc.defined() ? bc.data_ptr<BF16>() : nullptr,
               y.data_ptr<BF16>(), M, K, N);
  } else {
    TORCH_CHECK(false, "row_linear: float32 or bfloat16, not ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(goodspeed, m) { m.def("row_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) { m.impl("row_linear", &row_linear_op); }
