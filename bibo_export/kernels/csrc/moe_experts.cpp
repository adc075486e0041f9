// ExecuTorch kernels for BiBo's routed SwiGLU experts, computed for the selected experts only:
//
//   out[t] = sum_j [indices[t, j] < E] * weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t)
//
// with e = indices[t, j]. Indices >= E name BiBo's parameter-free experts, which the graph
// computes itself, so they are skipped here. The reference semantics are the PyTorch
// implementations in bibo_export/kernels/moe_experts.py; tests compare the two.
//
// bibo::moe_experts.out       fp32 weights gate/up [E, m, h], down [E, h, m]
// bibo::moe_experts_int8.out  int8 weights of the same shapes, one fp32 scale per row, times
//                             int8 activations with one scale per token, quantized at each
//                             call (the input, and each expert's hidden activation before
//                             its down projection), as 8da8w linears do
// bibo::moe_experts_int4.out  int4 weights in [-8, 7], two to a byte (column 2i in the low
//                             nibble), [E, rows, ceil(cols / 2)] uint8, one fp32 scale per
//                             group of group_size columns of a row [E, rows, groups], times
//                             the same int8 activations: each group's integer sum is exact,
//                             then scaled by its group's scale ("8da4w"); groups are a
//                             multiple of 32 columns, a row's last group may be shorter
//
// Work is grouped by expert: an expert's weight rows are read once per call, for every token
// that chose it, so a decode step reads k experts and a prefill reads each chosen expert once.
// A counter of the weight bytes read lets benchmarks and tests check that claim from what the
// kernel actually touched (bibo_kernels_weight_bytes_read).
//
// The int8 dot products use the x86 instructions the library is compiled for (AVX2, VNNI), or
// on aarch64 the CPU's own: sdot where it has ARMv8.2's dot product, NEON otherwise, chosen
// when the library loads, so that one build runs on every ARMv8-A CPU; a scalar loop
// elsewhere. All give the same exact int32 sums (x86's for weights in [-127, 127], as
// quantize_rows makes them); bibo_kernels_int8_path names the path this process uses. The int4
// kernel splits each vector of weight bytes into its low and high nibbles and multiplies them,
// with the same instructions, by the tokens' even and odd columns, which it lays out so once
// per call.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "float8.h"

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#include <asm/hwcap.h>  // HWCAP_ASIMDDP: Linux's, which not every libc's <sys/auxv.h> includes
#include <sys/auxv.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace bibo {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::tensors_have_same_shape;

std::atomic<uint64_t> weight_bytes_read{0};
std::atomic<uint64_t> experts_run{0};

// One expert matrix [rows, cols]: float rows, or int8 rows with one scale each.
template <typename T>
struct Matrix {
  const T* data;
  const float* scale;  // nullptr for float weights
  int64_t cols;

  int64_t row_bytes() const { return cols * sizeof(T) + (scale ? sizeof(float) : 0); }
  const char* bytes() const { return reinterpret_cast<const char*>(data); }
  int64_t stored_row_bytes() const { return cols * sizeof(T); }
};

// One int4 expert matrix [rows, cols]: rows of ceil(cols / 2) bytes, two weights to a byte,
// and one scale per group of `group` columns (the last group of a row may be shorter).
struct Int4Matrix {
  const uint8_t* data;
  const float* scale;  // [rows, groups()]
  int64_t cols, group;

  int64_t stored_row_bytes() const { return (cols + 1) / 2; }
  int64_t groups() const { return (cols + group - 1) / group; }
  int64_t row_bytes() const { return stored_row_bytes() + groups() * sizeof(float); }
  const char* bytes() const { return reinterpret_cast<const char*>(data); }
};

// A call's token rows as a product reads them: float rows for float weights; for int8 weights,
// int8 rows with one symmetric scale per token (max |x| / 127, rounded half to even), the
// quantization of moe_experts.py's quantize_rows.
struct FloatTokens {
  const float* data;
  int64_t count, cols;
};

struct Int8Tokens {
  std::vector<int8_t> q;
  std::vector<uint8_t> magnitude;  // |q|: the unsigned operand of x86's u8 x s8 dot product
  std::vector<float> scale;
  int64_t count, cols;
  // For int4 weights: q again, each chunk of NIBBLE_CHUNK columns as its even columns, then
  // its odd ones (the order of the low, then the high nibbles of the chunk's weight bytes);
  // columns past the last whole chunk are not repeated here. On x86, also each chunk's
  // nibble_offset (see int4_chunks).
  std::vector<int8_t> paired_q;
  std::vector<int32_t> nibble_offset;
};

// Columns of int4 weights one vector step takes: a register of weight bytes holds twice as
// many nibbles. Groups are multiples of 32 columns, so each 16-byte half of a step lies in one
// group.
#if defined(__AVX2__)
constexpr int64_t NIBBLE_CHUNK = 64;
#else
constexpr int64_t NIBBLE_CHUNK = 32;
#endif
constexpr int64_t INT4_GROUP_MULTIPLE = 32;

FloatTokens tokens_for(const float* x, int64_t count, int64_t cols, const Matrix<float>&) {
  return {x, count, cols};
}

Int8Tokens quantize_tokens(const float* x, int64_t count, int64_t cols) {
  Int8Tokens tokens{std::vector<int8_t>(count * cols), std::vector<uint8_t>(count * cols),
                    std::vector<float>(count), count, cols, {}, {}};
  for (int64_t t = 0; t < count; ++t) {
    const float* row = x + t * cols;
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    const float scale = std::max(amax, 1e-12f) / 127.f;
    for (int64_t c = 0; c < cols; ++c) {
      // Divided, not multiplied by a reciprocal, and rounded half to even (the default
      // rounding mode): the same integers as torch.round(x / scale).
      const float q = std::min(127.f, std::max(-127.f, std::nearbyint(row[c] / scale)));
      tokens.q[t * cols + c] = static_cast<int8_t>(q);
      tokens.magnitude[t * cols + c] = static_cast<uint8_t>(std::fabs(q));
    }
    tokens.scale[t] = scale;
  }
  return tokens;
}

Int8Tokens tokens_for(const float* x, int64_t count, int64_t cols, const Matrix<int8_t>&) {
  return quantize_tokens(x, count, cols);
}

Int8Tokens tokens_for(const float* x, int64_t count, int64_t cols, const Int4Matrix&) {
  Int8Tokens tokens = quantize_tokens(x, count, cols);
  const int64_t paired = cols / NIBBLE_CHUNK * NIBBLE_CHUNK, half = NIBBLE_CHUNK / 2;
  tokens.paired_q.resize(count * paired);
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c = 0; c < paired; ++c) {
      const int64_t chunk = c - c % NIBBLE_CHUNK, i = c % NIBBLE_CHUNK;
      const int64_t from = t * cols + chunk + (i < half ? 2 * i : 2 * (i - half) + 1);
      tokens.paired_q[t * paired + c] = tokens.q[from];
    }
  }
#if defined(__AVX2__)
  // Per chunk, eight int32 lanes: -8 times the sum of x over the chunk's first 32 columns in
  // lane 0, over its last 32 in lane 4 (the first lanes of the two groups' halves).
  const int64_t chunks = cols / NIBBLE_CHUNK;
  tokens.nibble_offset.assign(count * chunks * 8, 0);
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c = 0; c < chunks * NIBBLE_CHUNK; ++c) {
      tokens.nibble_offset[(t * chunks + c / NIBBLE_CHUNK) * 8 + (c % NIBBLE_CHUNK < 32 ? 0 : 4)] -=
          8 * tokens.q[t * cols + c];
    }
  }
#endif
  return tokens;
}

// Rows fetched ahead of the block being computed. A decode step reads weights no cache holds,
// in blocks of four short rows that the hardware prefetcher does not pick up soon enough:
// fetching two blocks ahead took one int8 expert call at `bench` size from about 400 to about
// 170 us (medians over calls on experts not in cache, 2 threads, 2026-11-26).
constexpr int64_t PREFETCH_ROWS = 8;

template <typename M>
void prefetch_block(const M& w, int64_t r, int64_t r1) {
  if (r + PREFETCH_ROWS + 4 > r1) return;
  const char* ahead = w.bytes() + (r + PREFETCH_ROWS) * w.stored_row_bytes();
  const int64_t block_bytes = 4 * w.stored_row_bytes();
  for (int64_t b = 0; b < block_bytes; b += 64) __builtin_prefetch(ahead + b);
}

// ---------------------------------------------------------------- float weights and tokens
// y[r] = <W[r], x> for rows [r0, r0 + 4): four independent accumulators share each load of x,
// which keeps the FMA units busy where one accumulator would wait on its latency.
void dot4(const Matrix<float>& w, int64_t r0, const float* x, float* y) {
  const int64_t n = w.cols;
  const float* w0 = w.data + r0 * n;
  f8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f8 xv = load8(x + i);
    a0 += load8(w0 + i) * xv;
    a1 += load8(w0 + n + i) * xv;
    a2 += load8(w0 + 2 * n + i) * xv;
    a3 += load8(w0 + 3 * n + i) * xv;
  }
  float s[4] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
  for (; i < n; ++i) {
    for (int r = 0; r < 4; ++r) s[r] += w0[r * n + i] * x[i];
  }
  std::memcpy(y, s, sizeof(s));
}

// The same for four tokens at once, ys[t][r0 + r] for t, r < 4: sixteen accumulators share
// each load of four weight and four token vectors, where dot4 per token loads five vectors
// for four products (a prefill's expert products are then bound by arithmetic, not loads).
void dot4x4(const Matrix<float>& w, int64_t r0, const float* xs, int64_t x_stride, float* ys,
            int64_t y_stride) {
  const int64_t n = w.cols;
  const float* w0 = w.data + r0 * n;
  f8 a[4][4] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f8 wv[4] = {load8(w0 + i), load8(w0 + n + i), load8(w0 + 2 * n + i),
                      load8(w0 + 3 * n + i)};
    for (int t = 0; t < 4; ++t) {
      const f8 xv = load8(xs + t * x_stride + i);
      for (int r = 0; r < 4; ++r) a[t][r] += wv[r] * xv;
    }
  }
  for (int t = 0; t < 4; ++t) {
    const float* x = xs + t * x_stride;
    for (int r = 0; r < 4; ++r) {
      float s = sum8(a[t][r]);
      for (int64_t c = i; c < n; ++c) s += w0[r * n + c] * x[c];
      ys[t * y_stride + r] = s;
    }
  }
}

float dot1(const Matrix<float>& w, int64_t r, const float* x) {
  return dot(w.data + r * w.cols, x, w.cols);
}

// ys[t][r] = W[r] . xs[t] for rows [r0, r1) and every token t.
void project(const Matrix<float>& w, int64_t r0, int64_t r1, const FloatTokens& xs, float* ys,
             int64_t y_stride) {
  const int64_t x_stride = xs.cols;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    prefetch_block(w, r, r1);
    int64_t t = 0;
    for (; t + 4 <= xs.count; t += 4) {
      dot4x4(w, r, xs.data + t * x_stride, x_stride, ys + t * y_stride + r, y_stride);
    }
    for (; t < xs.count; ++t) dot4(w, r, xs.data + t * x_stride, ys + t * y_stride + r);
  }
  for (; r < r1; ++r) {
    for (int64_t t = 0; t < xs.count; ++t) {
      ys[t * y_stride + r] = dot1(w, r, xs.data + t * x_stride);
    }
  }
}

// ----------------------------------------------------------------- int8 weights and tokens
#if defined(__AVX2__)
// acc + the sums of four adjacent products of magnitude (u8) and signed_w (s8) per int32 lane.
// With VNNI that is one instruction; AVX2 adds pairs into int16 first, which cannot saturate
// here: |q| <= 127 on both sides, so a pair is at most 2 * 127 * 127 < 32767.
inline __m256i dot_u8s8(__m256i acc, __m256i magnitude, __m256i signed_w) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, magnitude, signed_w);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, magnitude, signed_w);
#else
  const __m256i pairs = _mm256_maddubs_epi16(magnitude, signed_w);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

inline int32_t sum_lanes(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#elif defined(__aarch64__)
// Arm's products take two signed operands, so the magnitudes are not used here. The CPU is
// asked once, when the library loads.
const bool cpu_has_sdot = getauxval(AT_HWCAP) & HWCAP_ASIMDDP;

// acc[t][r] over the columns [0, c) that fill 16-byte vectors, returning c. `step(a, w, x)`
// adds the products of 16 weight and 16 token bytes into the four int32 lanes of a; inlined
// into each caller, the loop is compiled for that caller's instruction set.
template <int TOKENS, int ROWS, typename Step>
__attribute__((always_inline)) inline int64_t arm_dots(const int8_t* w0, int64_t w_stride,
                                                       const int8_t* x0, int64_t x_stride,
                                                       int64_t n, int32_t acc[TOKENS][ROWS],
                                                       Step step) {
  int32x4_t a[TOKENS][ROWS];
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) a[t][r] = vdupq_n_s32(0);
  }
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    int8x16_t wv[ROWS];
    for (int r = 0; r < ROWS; ++r) wv[r] = vld1q_s8(w0 + r * w_stride + c);
    for (int t = 0; t < TOKENS; ++t) {
      const int8x16_t x = vld1q_s8(x0 + t * x_stride + c);
      for (int r = 0; r < ROWS; ++r) a[t][r] = step(a[t][r], wv[r], x);
    }
  }
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) acc[t][r] = vaddvq_s32(a[t][r]);
  }
  return c;
}

// sdot adds the four products of each group of bytes into an int32 lane. Compiled for ARMv8.2
// plus the extension (a CPU that has it implements ARMv8.2), and called only where the CPU
// has it.
template <int TOKENS, int ROWS>
__attribute__((target("arch=armv8.2-a+dotprod"))) int64_t sdot_dots(
    const int8_t* w0, int64_t w_stride, const int8_t* x0, int64_t x_stride, int64_t n,
    int32_t acc[TOKENS][ROWS]) {
  return arm_dots<TOKENS, ROWS>(
      w0, w_stride, x0, x_stride, n, acc,
      [](int32x4_t a, int8x16_t w, int8x16_t x)
          __attribute__((target("arch=armv8.2-a+dotprod"))) { return vdotq_s32(a, w, x); });
}

// ARMv8.0's NEON: smull and smlal2 put the products of the low and the high eight bytes into
// the same int16 lanes, two products to a lane, and sadalp adds adjacent lanes into int32. A
// lane cannot overflow: tokens are quantized to |x| <= 127 and weights are int8, |w| <= 128,
// so two products are at most 2 * 127 * 128 = 32512 <= 32767.
template <int TOKENS, int ROWS>
int64_t neon_dots(const int8_t* w0, int64_t w_stride, const int8_t* x0, int64_t x_stride,
                  int64_t n, int32_t acc[TOKENS][ROWS]) {
  return arm_dots<TOKENS, ROWS>(w0, w_stride, x0, x_stride, n, acc,
                                [](int32x4_t a, int8x16_t w, int8x16_t x) {
    return vpadalq_s16(a, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
  });
}
#endif

// acc[t][r] = <w0[r], x[t]> over n columns for TOKENS tokens and ROWS rows, exact in int32:
// weight row r starts at w0 + r * w_stride, and token t's columns at offset `column` of its
// row of xs (from token t0). x86's integer product takes an unsigned operand: |x| times w
// with x's sign moved onto w.
template <int TOKENS, int ROWS>
void int8_dots(const int8_t* w0, int64_t w_stride, const Int8Tokens& xs, int64_t t0,
               int64_t column, int64_t n, int32_t acc[TOKENS][ROWS]) {
  const int64_t x_stride = xs.cols;
  const int8_t* x0 = xs.q.data() + t0 * x_stride + column;
  int64_t c = 0;
#if defined(__AVX2__)
  const uint8_t* m0 = xs.magnitude.data() + t0 * x_stride + column;
  __m256i a[TOKENS][ROWS];
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) a[t][r] = _mm256_setzero_si256();
  }
  for (; c + 32 <= n; c += 32) {
    __m256i wv[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + r * w_stride + c));
    }
    for (int t = 0; t < TOKENS; ++t) {
      const __m256i x =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + t * x_stride + c));
      const __m256i m =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m0 + t * x_stride + c));
      for (int r = 0; r < ROWS; ++r) a[t][r] = dot_u8s8(a[t][r], m, _mm256_sign_epi8(wv[r], x));
    }
  }
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) acc[t][r] = sum_lanes(a[t][r]);
  }
#elif defined(__aarch64__)
  c = cpu_has_sdot ? sdot_dots<TOKENS, ROWS>(w0, w_stride, x0, x_stride, n, acc)
                   : neon_dots<TOKENS, ROWS>(w0, w_stride, x0, x_stride, n, acc);
#else
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) acc[t][r] = 0;
  }
#endif
  for (; c < n; ++c) {
    for (int t = 0; t < TOKENS; ++t) {
      for (int r = 0; r < ROWS; ++r) {
        acc[t][r] += int32_t{w0[r * w_stride + c]} * x0[t * x_stride + c];
      }
    }
  }
}

// The path int8_dots takes in this process, by the conditions it tests.
const char* int8_path() {
#if defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__aarch64__)
  return cpu_has_sdot ? "sdot" : "neon";
#else
  return "scalar";
#endif
}

// ys[t][r] for a tile: the integer dot product times the token's and the row's scales, in
// that order, as selected_experts_int8 multiplies them.
template <int TOKENS, int ROWS>
void integer_tile(const Matrix<int8_t>& w, int64_t r0, const Int8Tokens& xs, int64_t t0,
                  float* ys, int64_t y_stride) {
  int32_t acc[TOKENS][ROWS];
  int8_dots<TOKENS, ROWS>(w.data + r0 * w.cols, w.cols, xs, t0, 0, w.cols, acc);
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) {
      ys[(t0 + t) * y_stride + r0 + r] =
          static_cast<float>(acc[t][r]) * xs.scale[t0 + t] * w.scale[r0 + r];
    }
  }
}

// ------------------------------------------------------------------------- int4 weights
// sums[t][r] += sum over the whole chunks of columns [0, c) of scale(group) * (the chunk's
// exact integer products), returning c. A chunk's weight bytes are split into their low
// nibbles (the chunk's even columns) and high nibbles (its odd ones), sign-extended, and
// multiplied with the tokens' paired columns by the int8 dot products; each 16-byte half of a
// vector's int32 lanes lies in one group and is scaled by its group's scale.
#if defined(__AVX2__)
// x86's integer product takes an unsigned operand: each nibble with its top bit flipped, which
// turns a two's complement w into w + 8 in [0, 16), times the signed tokens; the nibble_offset
// lanes (-8 times each 32 columns' token sum) start the sums, so that they come out as w's.
template <int TOKENS, int ROWS>
int64_t int4_chunks(const Int4Matrix& w, int64_t r0, const Int8Tokens& xs, int64_t t0,
                    float sums[TOKENS][ROWS]) {
  const int64_t chunks = w.cols / NIBBLE_CHUNK, paired = chunks * NIBBLE_CHUNK;
  const int64_t stored = w.stored_row_bytes(), groups = w.groups();
  const __m256i low_bits = _mm256_set1_epi8(0x0F), top_bits = _mm256_set1_epi8(-0x78);
  const __m256i one_scale = _mm256_setzero_si256(),
                two_scales = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[TOKENS][ROWS];
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) acc[t][r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t c = k * NIBBLE_CHUNK;
    // Each 32-column half of the chunk lies in one group (groups are multiples of 32): both
    // in the same one, or in two consecutive ones, whose scales are then loaded together.
    const int64_t first = c / w.group;
    const bool two_groups = (c + 32) / w.group > first;
    const __m256i pick = two_groups ? two_scales : one_scale;
    __m256i low[ROWS], high[ROWS];
    __m256 scale[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      const __m256i bytes = _mm256_xor_si256(top_bits, _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w.data + (r0 + r) * stored + c / 2)));
      low[r] = _mm256_and_si256(bytes, low_bits);
      high[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_bits);
      const float* at = w.scale + (r0 + r) * groups + first;
      const __m128 scales = two_groups ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(at)))
                                       : _mm_load_ss(at);
      scale[r] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(scales), pick);
    }
    for (int t = 0; t < TOKENS; ++t) {
      const int8_t* x = &xs.paired_q[(t0 + t) * paired + c];
      const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
      const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
      const __m256i offset = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(&xs.nibble_offset[((t0 + t) * chunks + k) * 8]));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i dots = dot_u8s8(dot_u8s8(offset, low[r], even), high[r], odd);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale[r], acc[t][r]);
      }
    }
  }
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t][r]), _mm256_extractf128_ps(acc[t][r], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      sums[t][r] += _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    }
  }
  return paired;
}
#elif defined(__aarch64__)
template <int TOKENS, int ROWS, typename Step>
__attribute__((always_inline)) inline int64_t arm_int4_chunks(const Int4Matrix& w, int64_t r0,
                                                              const Int8Tokens& xs, int64_t t0,
                                                              float sums[TOKENS][ROWS],
                                                              Step step) {
  const int64_t chunks = w.cols / NIBBLE_CHUNK, paired = chunks * NIBBLE_CHUNK;
  const int64_t stored = w.stored_row_bytes(), groups = w.groups();
  const int8x16_t eight = vdupq_n_s8(8);
  float32x4_t acc[TOKENS][ROWS];
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) acc[t][r] = vdupq_n_f32(0.f);
  }
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t c = k * NIBBLE_CHUNK;
    int8x16_t even[ROWS], odd[ROWS];
    float scale[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      const uint8x16_t bytes = vld1q_u8(w.data + (r0 + r) * stored + c / 2);
      even[r] = vsubq_s8(veorq_s8(vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0F))), eight),
                         eight);
      odd[r] = vsubq_s8(veorq_s8(vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4)), eight), eight);
      scale[r] = w.scale[(r0 + r) * groups + c / w.group];
    }
    for (int t = 0; t < TOKENS; ++t) {
      const int64_t at = (t0 + t) * paired + c;
      const int8x16_t xe = vld1q_s8(&xs.paired_q[at]), xo = vld1q_s8(&xs.paired_q[at + 16]);
      for (int r = 0; r < ROWS; ++r) {
        const int32x4_t dots = step(step(vdupq_n_s32(0), even[r], xe), odd[r], xo);
        acc[t][r] = vfmaq_n_f32(acc[t][r], vcvtq_f32_s32(dots), scale[r]);
      }
    }
  }
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < ROWS; ++r) sums[t][r] += vaddvq_f32(acc[t][r]);
  }
  return paired;
}

template <int TOKENS, int ROWS>
__attribute__((target("arch=armv8.2-a+dotprod"))) int64_t sdot_int4_chunks(
    const Int4Matrix& w, int64_t r0, const Int8Tokens& xs, int64_t t0, float sums[TOKENS][ROWS]) {
  return arm_int4_chunks<TOKENS, ROWS>(
      w, r0, xs, t0, sums,
      [](int32x4_t a, int8x16_t w, int8x16_t x)
          __attribute__((target("arch=armv8.2-a+dotprod"))) { return vdotq_s32(a, w, x); });
}

// NEON's products as neon_dots takes them: here |w| <= 8, so an int16 lane holds two easily.
template <int TOKENS, int ROWS>
int64_t neon_int4_chunks(const Int4Matrix& w, int64_t r0, const Int8Tokens& xs, int64_t t0,
                         float sums[TOKENS][ROWS]) {
  return arm_int4_chunks<TOKENS, ROWS>(w, r0, xs, t0, sums,
                                       [](int32x4_t a, int8x16_t w, int8x16_t x) {
    return vpadalq_s16(a, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
  });
}

template <int TOKENS, int ROWS>
int64_t int4_chunks(const Int4Matrix& w, int64_t r0, const Int8Tokens& xs, int64_t t0,
                    float sums[TOKENS][ROWS]) {
  return cpu_has_sdot ? sdot_int4_chunks<TOKENS, ROWS>(w, r0, xs, t0, sums)
                      : neon_int4_chunks<TOKENS, ROWS>(w, r0, xs, t0, sums);
}
#else
template <int TOKENS, int ROWS>
int64_t int4_chunks(const Int4Matrix&, int64_t, const Int8Tokens&, int64_t, float[TOKENS][ROWS]) {
  return 0;
}
#endif

// Weight (r, c) of an int4 matrix, its nibble sign-extended.
inline int32_t nibble(const Int4Matrix& w, int64_t r, int64_t c) {
  const uint8_t byte = w.data[r * w.stored_row_bytes() + c / 2];
  return static_cast<int8_t>(c % 2 ? byte & 0xF0 : byte << 4) >> 4;
}

// ys[t][r0 + r] for a tile: each group's exact integer sum times the group's scale, summed
// over the groups, then times the token's scale, as selected_experts_int4 computes it (the
// vector paths add the groups' scaled sums in another order). Columns past the whole chunks
// are summed here, group by group.
template <int TOKENS, int ROWS>
void integer_tile(const Int4Matrix& w, int64_t r0, const Int8Tokens& xs, int64_t t0, float* ys,
                  int64_t y_stride) {
  float sums[TOKENS][ROWS] = {};
  const int64_t done = int4_chunks<TOKENS, ROWS>(w, r0, xs, t0, sums);
  const int64_t groups = w.groups();
  for (int t = 0; t < TOKENS; ++t) {
    const int8_t* x = xs.q.data() + (t0 + t) * xs.cols;
    for (int r = 0; r < ROWS; ++r) {
      const float* scale = w.scale + (r0 + r) * groups;
      for (int64_t c0 = done; c0 < w.cols; c0 = (c0 / w.group + 1) * w.group) {
        const int64_t c1 = std::min(w.cols, (c0 / w.group + 1) * w.group);
        int32_t group_sum = 0;
        for (int64_t c = c0; c < c1; ++c) group_sum += nibble(w, r0 + r, c) * x[c];
        sums[t][r] += static_cast<float>(group_sum) * scale[c0 / w.group];
      }
      ys[(t0 + t) * y_stride + r0 + r] = sums[t][r] * xs.scale[t0 + t];
    }
  }
}

// ys[t][r] = W[r] . xs[t] for rows [r0, r1) and every token t, integer weights (int8 or int4)
// in tiles of four rows by four tokens where they fit.
template <typename M>
void project(const M& w, int64_t r0, int64_t r1, const Int8Tokens& xs, float* ys,
             int64_t y_stride) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    prefetch_block(w, r, r1);
    int64_t t = 0;
    for (; t + 4 <= xs.count; t += 4) integer_tile<4, 4>(w, r, xs, t, ys, y_stride);
    for (; t < xs.count; ++t) integer_tile<1, 4>(w, r, xs, t, ys, y_stride);
  }
  for (; r < r1; ++r) {
    for (int64_t t = 0; t < xs.count; ++t) integer_tile<1, 1>(w, r, xs, t, ys, y_stride);
  }
}

// fn(r0, r1) over row ranges of [0, rows) on ExecuTorch's threadpool, each range a multiple of
// four rows except at the end. Products too small to pay for waking the other threads stay
// on the calling thread.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t work_per_row, const Fn& fn) {
  const int64_t blocks = (rows + 3) / 4;
  const int64_t threads = std::max<int64_t>(1, executorch::extension::get_thread_count());
  if (threads == 1 || rows * work_per_row < (int64_t{1} << 16)) {
    fn(0, rows);
    return;
  }
  executorch::extension::parallel_for(
      0, blocks, (blocks + threads - 1) / threads,
      [&](int64_t b0, int64_t b1) { fn(b0 * 4, std::min(rows, b1 * 4)); });
}

struct Assignment {
  int64_t token;
  float weight;
};

// One expert on the tokens assigned to it; adds weight * expert(x_t) into out.
template <typename M>
void run_expert(const M& gate, const M& up, const M& down,
                int64_t width, int64_t hidden, const float* x,
                const std::vector<Assignment>& assigned, float* out) {
  const int64_t n = static_cast<int64_t>(assigned.size());
  std::vector<float> xs(n * hidden), g(n * width), u(n * width), ys(n * hidden);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(&xs[i * hidden], x + assigned[i].token * hidden, hidden * sizeof(float));
  }
  const auto inputs = tokens_for(xs.data(), n, hidden, gate);
  parallel_rows(width, 2 * n * hidden, [&](int64_t r0, int64_t r1) {
    project(gate, r0, r1, inputs, g.data(), width);
    project(up, r0, r1, inputs, u.data(), width);
  });
  for (int64_t i = 0; i < n * width; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  const auto activations = tokens_for(g.data(), n, width, down);
  parallel_rows(hidden, n * width, [&](int64_t r0, int64_t r1) {
    project(down, r0, r1, activations, ys.data(), hidden);
  });
  for (int64_t i = 0; i < n; ++i) {
    float* dst = out + assigned[i].token * hidden;
    const float* src = &ys[i * hidden];
    for (int64_t c = 0; c < hidden; ++c) dst[c] += assigned[i].weight * src[c];
  }
  weight_bytes_read += static_cast<uint64_t>(width * (gate.row_bytes() + up.row_bytes()) +
                                             hidden * down.row_bytes());
  experts_run += 1;
}

// Shapes and types of one call; false (with a logged reason) if they do not fit together.
// Weights hold `per_byte` values to a byte along their rows (2 for int4).
bool check_arguments(const Tensor& x, const Tensor& indices, const Tensor& weights,
                     const Tensor& gate, const Tensor& up, const Tensor& down,
                     ScalarType weight_type, int64_t per_byte = 1) {
  ET_LOG_MSG_AND_RETURN_IF_FALSE(x.scalar_type() == ScalarType::Float && x.dim() == 2,
                                 "bibo::moe_experts: x must be float32 [S, h]");
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      indices.scalar_type() == ScalarType::Long && indices.dim() == 2 &&
          indices.size(0) == x.size(0),
      "bibo::moe_experts: indices must be int64 [S, k]");
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      weights.scalar_type() == ScalarType::Float && tensors_have_same_shape(weights, indices),
      "bibo::moe_experts: weights must be float32 [S, k] like indices");
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      gate.scalar_type() == weight_type && up.scalar_type() == weight_type &&
          down.scalar_type() == weight_type,
      "bibo::moe_experts: expert weights of the wrong type");
  const auto stored = [per_byte](int64_t cols) { return (cols + per_byte - 1) / per_byte; };
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      gate.dim() == 3 && tensors_have_same_shape(gate, up) && down.dim() == 3 &&
          down.size(0) == gate.size(0) && gate.size(2) == stored(x.size(1)) &&
          down.size(1) == x.size(1) && down.size(2) == stored(gate.size(1)),
      "bibo::moe_experts: expert weights must be gate/up [E, m, h], down [E, h, m]");
  return true;
}

// One scale per row ([E, rows]), or per group of a row ([E, rows, groups]).
bool check_scales(const Tensor& scale, const Tensor& weight, int64_t groups = 0) {
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      scale.scalar_type() == ScalarType::Float && scale.dim() == (groups ? 3 : 2) &&
          scale.size(0) == weight.size(0) && scale.size(1) == weight.size(1) &&
          (!groups || scale.size(2) == groups),
      "bibo::moe_experts: scales must be float32 [E, rows] (int8), [E, rows, groups] (int4)");
  return true;
}

// Sizes out as x, groups the (token, choice) pairs by expert, then runs each chosen expert
// once; `matrices(e)` gives expert e's gate, up and down matrices.
template <typename Matrices>
bool compute(const Tensor& x, const Tensor& indices, const Tensor& weights, int64_t experts,
             int64_t width, const Matrices& matrices, Tensor& out) {
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok,
      "bibo::moe_experts: cannot resize the output to the input's shape");
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = indices.size(1);
  const int64_t* index = indices.const_data_ptr<int64_t>();
  const float* weight = weights.const_data_ptr<float>();
  std::vector<std::vector<Assignment>> by_expert(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t e = index[t * top_k + j];
      ET_LOG_MSG_AND_RETURN_IF_FALSE(e >= 0, "bibo::moe_experts: negative expert index");
      if (e < experts) by_expert[e].push_back({t, weight[t * top_k + j]});
    }
  }
  float* y = out.mutable_data_ptr<float>();
  std::fill(y, y + tokens * hidden, 0.f);
  const float* xs = x.const_data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    if (by_expert[e].empty()) continue;
    const auto [gate, up, down] = matrices(e);
    run_expert(gate, up, down, width, hidden, xs, by_expert[e], y);
  }
  return true;
}

Tensor& moe_experts_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& indices,
                        const Tensor& weights, const Tensor& gate, const Tensor& up,
                        const Tensor& down, Tensor& out) {
  ET_KERNEL_CHECK(ctx, check_arguments(x, indices, weights, gate, up, down, ScalarType::Float),
                  InvalidArgument, out);
  const int64_t width = gate.size(1), hidden = x.size(1), matrix = width * hidden;
  const auto matrices = [&](int64_t e) {
    return std::array<Matrix<float>, 3>{
        Matrix<float>{gate.const_data_ptr<float>() + e * matrix, nullptr, hidden},
        Matrix<float>{up.const_data_ptr<float>() + e * matrix, nullptr, hidden},
        Matrix<float>{down.const_data_ptr<float>() + e * matrix, nullptr, width}};
  };
  ET_KERNEL_CHECK(ctx, compute(x, indices, weights, gate.size(0), width, matrices, out),
                  InvalidArgument, out);
  return out;
}

Tensor& moe_experts_int8_out(KernelRuntimeContext& ctx, const Tensor& x,
                             const Tensor& indices, const Tensor& weights, const Tensor& gate,
                             const Tensor& gate_scale, const Tensor& up,
                             const Tensor& up_scale, const Tensor& down,
                             const Tensor& down_scale, Tensor& out) {
  ET_KERNEL_CHECK(ctx, check_arguments(x, indices, weights, gate, up, down, ScalarType::Char),
                  InvalidArgument, out);
  ET_KERNEL_CHECK(ctx,
                  check_scales(gate_scale, gate) && check_scales(up_scale, up) &&
                      check_scales(down_scale, down),
                  InvalidArgument, out);
  const int64_t width = gate.size(1), hidden = x.size(1), matrix = width * hidden;
  const auto matrices = [&](int64_t e) {
    return std::array<Matrix<int8_t>, 3>{
        Matrix<int8_t>{gate.const_data_ptr<int8_t>() + e * matrix,
                       gate_scale.const_data_ptr<float>() + e * width, hidden},
        Matrix<int8_t>{up.const_data_ptr<int8_t>() + e * matrix,
                       up_scale.const_data_ptr<float>() + e * width, hidden},
        Matrix<int8_t>{down.const_data_ptr<int8_t>() + e * matrix,
                       down_scale.const_data_ptr<float>() + e * hidden, width}};
  };
  ET_KERNEL_CHECK(ctx, compute(x, indices, weights, gate.size(0), width, matrices, out),
                  InvalidArgument, out);
  return out;
}

Tensor& moe_experts_int4_out(KernelRuntimeContext& ctx, const Tensor& x,
                             const Tensor& indices, const Tensor& weights, const Tensor& gate,
                             const Tensor& gate_scale, const Tensor& up,
                             const Tensor& up_scale, const Tensor& down,
                             const Tensor& down_scale, int64_t group_size, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, group_size > 0 && group_size % INT4_GROUP_MULTIPLE == 0,
                      InvalidArgument, out,
                      "bibo::moe_experts_int4: group_size must be a multiple of 32");
  ET_KERNEL_CHECK(ctx,
                  check_arguments(x, indices, weights, gate, up, down, ScalarType::Byte, 2),
                  InvalidArgument, out);
  const int64_t width = gate.size(1), hidden = x.size(1);
  const auto groups = [group_size](int64_t cols) { return (cols + group_size - 1) / group_size; };
  ET_KERNEL_CHECK(ctx,
                  check_scales(gate_scale, gate, groups(hidden)) &&
                      check_scales(up_scale, up, groups(hidden)) &&
                      check_scales(down_scale, down, groups(width)),
                  InvalidArgument, out);
  const int64_t in_matrix = width * ((hidden + 1) / 2), out_matrix = hidden * ((width + 1) / 2);
  const auto matrices = [&](int64_t e) {
    return std::array<Int4Matrix, 3>{
        Int4Matrix{gate.const_data_ptr<uint8_t>() + e * in_matrix,
                   gate_scale.const_data_ptr<float>() + e * width * groups(hidden), hidden,
                   group_size},
        Int4Matrix{up.const_data_ptr<uint8_t>() + e * in_matrix,
                   up_scale.const_data_ptr<float>() + e * width * groups(hidden), hidden,
                   group_size},
        Int4Matrix{down.const_data_ptr<uint8_t>() + e * out_matrix,
                   down_scale.const_data_ptr<float>() + e * hidden * groups(width), width,
                   group_size}};
  };
  ET_KERNEL_CHECK(ctx, compute(x, indices, weights, gate.size(0), width, matrices, out),
                  InvalidArgument, out);
  return out;
}

}  // namespace
}  // namespace bibo

EXECUTORCH_LIBRARY(bibo, "moe_experts.out", bibo::moe_experts_out);
EXECUTORCH_LIBRARY(bibo, "moe_experts_int8.out", bibo::moe_experts_int8_out);
EXECUTORCH_LIBRARY(bibo, "moe_experts_int4.out", bibo::moe_experts_int4_out);

// Counters for benchmarks and tests, read through ctypes: bytes of expert weights (and
// scales) read, and experts run, since the last reset.
extern "C" {
__attribute__((visibility("default"))) uint64_t bibo_kernels_weight_bytes_read() {
  return bibo::weight_bytes_read.load();
}
__attribute__((visibility("default"))) uint64_t bibo_kernels_experts_run() {
  return bibo::experts_run.load();
}
__attribute__((visibility("default"))) void bibo_kernels_reset_counters() {
  bibo::weight_bytes_read = 0;
  bibo::experts_run = 0;
}
// Which int8 dot product this process runs: "avx-vnni", "avx512-vnni", "avx2", "sdot",
// "neon" or "scalar", for tests and runners to report beside their results.
__attribute__((visibility("default"))) const char* bibo_kernels_int8_path() {
  return bibo::int8_path();
}
}
