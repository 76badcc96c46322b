// y = x @ w.T (+ bias) for a few rows of x, on the CPU, float32 or bfloat16 weights
// (engine/model/linear.py says when it is used and why).
//
// Decoding and verifying multiply a few rows by each weight: the product is bound by reading the
// weight once. The weight is stored in blocks of 64 outputs, [ceil(N / 64), K, 64], so a block is
// contiguous (bfloat16 in pairs along k, [K / 2, 64, 2] a block: see the bfloat16 block_rows).
// A block is read as kStreams streams at once (below). For each k the kernel loads
// the block's 64 weights (4 AVX-512 vectors) once and multiplies them by x[r, k] broadcast, for up
// to 6 rows at a time; 24 accumulators stay in registers. With AVX2 (16 registers of 8 floats) it
// takes a block in passes of fewer outputs (below), and the passes ask for the next block's lines
// so that memory keeps streaming while they run.
//
// Every output is computed the same way whatever the number of rows: one sum over k in one fixed
// order (float32: a fused multiply-add per k; bfloat16: per pair of k), then the bias. So a token
// decoded alone and the same token verified among drafts get bit-identical products, which keeps
// greedy speculation exact in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "kernels.h"
#include "lanes.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using goodspeed::kWidth;
using goodspeed::Lanes;
using goodspeed::load_lanes;
using goodspeed::prefetch_lines;
using goodspeed::store;
constexpr int64_t kBlock = 64;  // outputs per block
constexpr int kVectors = kBlock / kWidth;  // 4 with AVX-512, 8 with AVX2
// A pass over k covers a few vectors of a block's outputs for up to kMaxRows rows, so that the
// accumulators, the pass's weights and a broadcast stay in registers. AVX-512 has 32 and takes
// a block in one pass of 4 vectors. AVX2 has 16: one row takes the block in one pass of 8
// vectors, 2 or 3 rows in two passes of 4 (weights as memory operands), 4 to 6 rows in four
// passes of 2 (12 accumulators, 2 weights, a broadcast), the later passes reading the block from
// L2. Passes of 4 vectors for more rows ran at half the FMA units' rate (12 loads of weights for
// 12 multiply-adds a k; bfloat16 spilled an accumulator to the stack), passes of 2 for fewer
// rows wait on the multiply-adds' latency.
constexpr int kMaxRows = 6;

template <int R>
constexpr int vectors_per_pass() {
  if (R == 1 || kVectors == 4) return kVectors;  // one row, or AVX-512: the whole block
  return R <= 3 ? 4 : 2;
}

// A one-pass block over bfloat16 weights (one row with AVX2, any number with AVX-512): how far
// ahead of the pair of k being computed its lines are asked for, in bytes (8 pairs; past a block's
// end that is the next block, and a prefetch past the weight's end is harmless). On an AMD EPYC
// (Zen 3, AVX2) each pair's four lines feed 16 widenings and 16 multiply-adds that wait on them in
// the scheduler, so fewer lines are in flight than in float32 (a line feeds 2 multiply-adds that
// read it directly): asked for ahead, a batch-1 decode step ran 4-7% faster. On an Intel Xeon (AMX
// host) the prefetcher restarts at every 4 KB page: with AVX-512 too, 1.15-1.25x
// (docs/decode-profile.md). float32 measured slower with it on both, so it asks for nothing.
constexpr int64_t kAheadBytes = 2048;

// A block's k (bfloat16: its pairs of k) are visited as kStreams runs taken in turn, a k from
// each: k = offset, offset + run, offset + 2 run, ... for offset = 0 .. run - 1. A core reading
// one stream keeps too few lines in flight to use the memory's bandwidth; with several the
// hardware prefetcher follows each. On an Intel Xeon (AMX host, 2 cores) reading 212 MB in one
// stream per core ran at 23 GB/s, in 4 at 32 GB/s (a triad: 28-30), and a batch-1 step's float32
// products took 17.1-17.6 ms instead of 20.5 (8 streams; 4: 17.6, 16: 17.8). The order is the same
// for any number of rows.
constexpr int64_t kStreams = 8;

// Lines of the next block to ask for while this one is computed, at a steady rate per k.
struct Prefetch {
  const char* next;  // the next line to ask for
  const char* end;   // the end of the next block (next == end: nothing to ask for)
  int per_k;         // lines per k of every pass
};

// out[r, 0..64) = x_r . block for R rows of x (float32, K apart) and one float32 block [K, 64].
template <int R>
void block_rows(const float* x, const uint32_t*, int64_t K, const float* block, float* out, Prefetch& ahead) {
  constexpr int V = vectors_per_pass<R>();
  for (int first = 0; first < kVectors; first += V) {
    Lanes acc[R][V] = {};
    const int64_t run = (K + kStreams - 1) / kStreams;
    for (int64_t offset = 0; offset < run; ++offset)
      for (int64_t k = offset; k < K; k += run) {
        for (int i = 0; i < ahead.per_k && ahead.next < ahead.end; ++i, ahead.next += 64) __builtin_prefetch(ahead.next);
        Lanes w[V];
        load_lanes<V>(block + k * kBlock + first * kWidth, w);
        for (int r = 0; r < R; ++r) {
          const float xk = x[r * K + k];
          for (int v = 0; v < V; ++v) acc[r][v] += xk * w[v];
        }
      }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) store(out + r * kBlock + (first + v) * kWidth, acc[r][v]);
  }
}

// The same over a bfloat16 block, stored in pairs along k: [K / 2, 64, 2] (K even, linear.py
// weight_blocks), so that one 32-bit word holds an output's weights at k and k + 1. With
// avx512_bf16 one dot-product instruction multiplies 16 outputs' pairs by the row's pair (x_pairs:
// its bfloat16 bits, two to a word) and adds both products: half the instructions of widening to
// float32 and two multiply-adds, where several rows make the product bound by arithmetic, not by
// memory (verification, batches). Elsewhere a word widens to two vectors (shifted up: k, masked:
// k + 1) for two multiply-adds. Either way an output's sum runs over k in the same order for any
// number of rows.
template <int R>
void block_rows(const float* x, const uint32_t* x_pairs, int64_t K, const c10::BFloat16* block, float* out,
                Prefetch& ahead) {
  constexpr int V = vectors_per_pass<R>();
  constexpr bool is_ahead = V == kVectors;  // one pass
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(block);
  const int64_t num_pairs = K / 2;
  for (int first = 0; first < kVectors; first += V) {
    Lanes acc[R][V] = {};
    const int64_t run = (num_pairs + kStreams - 1) / kStreams;
    for (int64_t offset = 0; offset < run; ++offset)
      for (int64_t kp = offset; kp < num_pairs; kp += run) {
        const uint16_t* pair_row = bits + kp * 2 * kBlock;
        if constexpr (is_ahead) prefetch_lines(reinterpret_cast<const char*>(pair_row) + kAheadBytes, 2 * kBlock * sizeof(uint16_t));
        for (int i = 0; i < 2 * ahead.per_k && ahead.next < ahead.end; ++i, ahead.next += 64) __builtin_prefetch(ahead.next);
#if defined(__AVX512BF16__)
        (void)x;
        __m512bh w[V];
        for (int v = 0; v < V; ++v)
          w[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pair_row + (first + v) * 2 * kWidth));
        for (int r = 0; r < R; ++r) {
          const __m512bh x_pair = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x_pairs[r * num_pairs + kp])));
          for (int v = 0; v < V; ++v)
            acc[r][v] = reinterpret_cast<Lanes>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc[r][v]), w[v], x_pair));
        }
#else
        (void)x_pairs;
        Lanes w[V][2];  // each vector's weights at k and at k + 1 (lanes.h's even and odd elements)
        for (int v = 0; v < V; ++v) load_lanes<2>(pair_row + (first + v) * 2 * kWidth, w[v]);
        for (int r = 0; r < R; ++r) {
          const float x_k = x[r * K + 2 * kp], x_next = x[r * K + 2 * kp + 1];
          for (int v = 0; v < V; ++v) {
            acc[r][v] += x_k * w[v][0];
            acc[r][v] += x_next * w[v][1];
          }
        }
#endif
      }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) store(out + r * kBlock + (first + v) * kWidth, acc[r][v]);
  }
}

template <typename W>
void block_rows(int num_rows, const float* x, const uint32_t* x_pairs, int64_t K, const W* block, float* out,
                Prefetch& ahead) {
  switch (num_rows) {
    case 1: return block_rows<1>(x, x_pairs, K, block, out, ahead);
    case 2: return block_rows<2>(x, x_pairs, K, block, out, ahead);
    case 3: return block_rows<3>(x, x_pairs, K, block, out, ahead);
    case 4: return block_rows<4>(x, x_pairs, K, block, out, ahead);
    case 5: return block_rows<5>(x, x_pairs, K, block, out, ahead);
    default: return block_rows<kMaxRows>(x, x_pairs, K, block, out, ahead);  // the caller passes at most kMaxRows
  }
}

// Passes over k that a block takes for M rows, in groups of kMaxRows and the rest.
int64_t passes_per_block(int64_t M) {
  constexpr int kPasses[kMaxRows + 1] = {0,
                                         kVectors / vectors_per_pass<1>(),
                                         kVectors / vectors_per_pass<2>(),
                                         kVectors / vectors_per_pass<3>(),
                                         kVectors / vectors_per_pass<4>(),
                                         kVectors / vectors_per_pass<5>(),
                                         kVectors / vectors_per_pass<6>()};
  return M / kMaxRows * kPasses[kMaxRows] + kPasses[M % kMaxRows];
}

// y[r, first .. first + num_out) = out[r, 0 .. num_out) (+ bias) for num_rows rows, N apart in y.
template <typename T>
void write_rows(const float* out, int64_t num_rows, int64_t num_out, const T* bias, int64_t first, T* y, int64_t N) {
  for (int64_t r = 0; r < num_rows; ++r)
    for (int64_t j = 0; j < num_out; ++j) {
      const float sum = out[r * kBlock + j];
      y[r * N + first + j] = static_cast<T>(bias ? sum + static_cast<float>(bias[first + j]) : sum);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// With AMX (Intel Xeon since Sapphire Rapids) one tile instruction multiplies 16 rows of 16 pairs
// of x by 16 pairs of k of 16 outputs. On such a CPU (2 cores, an AMX host) the loader kept
// oneDNN's AMX products from 3 rows over this kernel's vdpbf16ps, which runs there at 0.8x a
// float32 multiply-add's rate: verifying 8 drafts cost 1.5x a plain step. The bfloat16 block
// layout, [K / 2, 64, 2], is already the layout AMX takes for its second operand: a tile of 16
// pairs of k of 16 outputs is 16 rows of 64 bytes, 256 bytes apart. x's rows go in tiles of up to
// 16, and every row is computed the same way for any number of rows.
constexpr int64_t kTileRows = 16;  // rows of x per tile, and pairs of k per tile row
constexpr int64_t kTileBytes = 64;  // a tile row: 16 pairs of bfloat16, or 16 float32 sums

// Linux lends a process AMX's registers only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); false where it refuses, and the products take vdpbf16ps.
bool amx_granted() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

// Tiles 0-3: the sums of num_rows rows of x for a block's 4 groups of 16 outputs; 4: those rows
// of x; 5-7: weights. A tile of fewer rows costs less: configured for the rows there are rather
// than 16 zero-padded ones, a batch-1 step's products took 9.4-9.7 ms instead of 10.4 (Intel
// Xeon, AMX host), and the same products in cache 0.6-0.8x the time.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t num_rows[16] = {};
  explicit TileConfig(int64_t num_x_rows) {
    for (int t = 0; t < 8; ++t) {
      bytes_per_row[t] = kTileBytes;
      num_rows[t] = static_cast<uint8_t>(t <= 4 ? num_x_rows : kTileRows);
    }
  }
};

// few_rows_linear in bfloat16 on AMX, for K_blocks a multiple of 32.
//
// A tile's 16 pairs of k need not be neighbours: a tile load takes its rows at any stride. Step i
// takes pairs i, i + run, ..., i + 15 run of a block (run: K_blocks / 32), so a weight tile's 16
// rows come from 16 streams, each read in order as the steps go, which the hardware prefetcher
// follows. With 16 neighbouring pairs a step read one 4 KB page, and software had to ask for the
// next one: a batch-1 step's products took 9.2-9.3 ms instead of 10.0-10.2 (Intel Xeon, AMX host).
void few_rows_linear_amx(const c10::BFloat16* x, const c10::BFloat16* blocks, const c10::BFloat16* bias,
                         c10::BFloat16* y, int64_t M, int64_t K, int64_t K_blocks, int64_t N) {
  const int64_t num_pairs = K_blocks / 2, run = num_pairs / kTileRows;
  // x's rows as pairs of bfloat16 bits, a word each (an odd K's last pair padded with 0), in the
  // order the steps take them; rows num_pairs words apart
  const uint16_t* x_bits = reinterpret_cast<const uint16_t*>(x);
  std::vector<uint32_t> x_pairs(M * num_pairs);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < run; ++i)
      for (int64_t j = 0; j < kTileRows; ++j) {
        const int64_t k = 2 * (i + j * run);
        const uint32_t next = k + 1 < K ? x_bits[m * K + k + 1] : 0;
        x_pairs[m * num_pairs + i * kTileRows + j] = x_bits[m * K + k] | next << 16;
      }
  const int64_t x_stride = num_pairs * static_cast<int64_t>(sizeof(uint32_t));
  constexpr int64_t pair_row_bytes = 2 * kBlock * sizeof(c10::BFloat16);
  const int64_t weight_stride = run * pair_row_bytes;
  at::parallel_for(0, (N + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    int64_t num_tile_rows = 0;  // as configured
    alignas(64) float out[kTileRows * kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlock, num_out = std::min(kBlock, N - first);
      const char* block = reinterpret_cast<const char*>(blocks + b * K_blocks * kBlock);
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int64_t num_rows = std::min(kTileRows, M - m);
        if (num_rows != num_tile_rows) {  // once, or twice where M is over 16 and not a multiple
          const TileConfig config(num_rows);
          _tile_loadconfig(&config);
          num_tile_rows = num_rows;
        }
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const char* x_rows = reinterpret_cast<const char*>(x_pairs.data() + m * num_pairs);
        for (int64_t i = 0; i < run; ++i) {
          const char* pairs = block + i * pair_row_bytes;
          _tile_loadd(4, x_rows + i * kTileBytes, x_stride);
          _tile_loadd(5, pairs, weight_stride);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, pairs + kTileBytes, weight_stride);
          _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(7, pairs + 2 * kTileBytes, weight_stride);
          _tile_dpbf16ps(2, 4, 7);
          _tile_loadd(5, pairs + 3 * kTileBytes, weight_stride);
          _tile_dpbf16ps(3, 4, 5);
        }
        constexpr int64_t out_stride = kBlock * sizeof(float);
        _tile_stored(0, out, out_stride);
        _tile_stored(1, out + 16, out_stride);
        _tile_stored(2, out + 32, out_stride);
        _tile_stored(3, out + 48, out_stride);
        write_rows(out, num_rows, num_out, bias, first, y + m * N, N);
      }
    }
    _tile_release();
  });
}
#endif

// K_blocks: the blocks' k, K rounded up to even for bfloat16 (its pairs; the pad weighs 0).
template <typename T>
void few_rows_linear(const T* x, const T* blocks, const T* bias, T* y, int64_t M, int64_t K, int64_t K_blocks,
                     int64_t N) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (K_blocks % (2 * kTileRows) == 0 && amx_granted())
      return few_rows_linear_amx(x, blocks, bias, y, M, K, K_blocks, N);
  }
#endif
  // float32 rows K_blocks apart (zero-padded), read from cache for every block; for bfloat16 also
  // their bits two to a word, the pairs the dot products take
  std::vector<float> xf(M * K_blocks, 0.0f);
  for (int64_t m = 0; m < M; ++m) std::copy(x + m * K, x + (m + 1) * K, xf.begin() + m * K_blocks);
  std::vector<uint32_t> x_pairs;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    x_pairs.resize(M * K_blocks / 2);
    for (size_t i = 0; i < x_pairs.size(); ++i) {
      uint32_t words[2];
      std::memcpy(words, &xf[2 * i], sizeof(words));
      x_pairs[i] = (words[0] >> 16) | (words[1] & 0xFFFF0000u);
    }
  }
  K = K_blocks;
  // With one pass a block streams from memory at its speed. With several, the later ones read it
  // from L2 while memory would sit idle, so the passes ask for the next block's lines as they go.
  const int64_t block_bytes = K * kBlock * static_cast<int64_t>(sizeof(T)), passes = passes_per_block(M);
  const int per_k = passes > 1 ? static_cast<int>((block_bytes / 64 + passes * K - 1) / (passes * K)) : 0;
  at::parallel_for(0, (N + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    float out[kMaxRows * kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlock, num_out = std::min(kBlock, N - first);
      const char* next = reinterpret_cast<const char*>(blocks + (b + 1) * K * kBlock);
      Prefetch ahead{next, b + 1 < end && per_k ? next + block_bytes : next, per_k};
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const int num_rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m));
        const uint32_t* row_pairs = x_pairs.empty() ? nullptr : x_pairs.data() + m * K / 2;
        block_rows(num_rows, xf.data() + m * K, row_pairs, K, blocks + b * K * kBlock, out, ahead);
        write_rows(out, num_rows, num_out, bias, first, y + m * N, N);
      }
    }
  });
}

}  // namespace

namespace goodspeed {

at::Tensor few_rows_linear_op(const at::Tensor& x, const at::Tensor& blocks, int64_t num_out,
                              const c10::optional<at::Tensor>& bias) {
  const bool is_paired = x.scalar_type() == at::kBFloat16;  // K rounded up to even in the blocks
  TORCH_CHECK(x.dim() == 2 && blocks.dim() == 3 && blocks.size(2) == kBlock &&
                  blocks.size(1) == (is_paired ? x.size(1) + x.size(1) % 2 : x.size(1)),
              "few_rows_linear: x [M, K] and blocks [ceil(N / 64), K, 64] (bfloat16: K rounded up to even)");
  TORCH_CHECK(num_out > 0 && (num_out + kBlock - 1) / kBlock == blocks.size(0), "few_rows_linear: N fits the blocks");
  TORCH_CHECK(x.scalar_type() == blocks.scalar_type(), "few_rows_linear: x and the weight of one dtype");
  const at::Tensor xc = x.contiguous(), wc = blocks.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!bc.defined() || (bc.numel() == num_out && bc.scalar_type() == x.scalar_type()),
              "few_rows_linear: bias [N] of the weight's dtype");
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor y = at::empty({M, num_out}, x.options());
  if (x.scalar_type() == at::kFloat) {
    few_rows_linear(xc.data_ptr<float>(), wc.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr,
                    y.data_ptr<float>(), M, K, wc.size(1), num_out);
  } else if (x.scalar_type() == at::kBFloat16) {
    using BF16 = c10::BFloat16;
    few_rows_linear(xc.data_ptr<BF16>(), wc.data_ptr<BF16>(), bc.defined() ? bc.data_ptr<BF16>() : nullptr,
                    y.data_ptr<BF16>(), M, K, wc.size(1), num_out);
  } else {
    TORCH_CHECK(false, "few_rows_linear: float32 or bfloat16, not ", x.scalar_type());
  }
  return y;
}

}  // namespace goodspeed

TORCH_LIBRARY_FRAGMENT(goodspeed, m) {
  m.def("few_rows_linear(Tensor x, Tensor blocks, int num_out, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) { m.impl("few_rows_linear", &goodspeed::few_rows_linear_op); }
