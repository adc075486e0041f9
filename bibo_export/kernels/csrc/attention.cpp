// ExecuTorch kernels for attention over BiBo's static KV cache, laid out [B, G, max_len, d]:
//
// bibo::update_cache.out     new [B, G, T, d] written into cache slots start .. start + T - 1,
//                            in place (the schema marks the cache as written)
// bibo::cache_attention.out  q [B, H, T, d] → out [B, T, H * d]: query t of head h attends the
//                            slots 0 .. start + t of KV head h / (H / G), causal softmax
//
// A decode step at position p reads p + 1 cache slots per head, not the whole static cache.
// Tensors are float32 or bfloat16 (bf16 programs), all of one type; bf16 is computed in float.
// The reference semantics are the PyTorch implementations in bibo_export/kernels/attention.py;
// tests compare the two. Strides are read from the tensors, so any dim order the program
// gives a tensor (a size-1 head or token dimension makes several equally valid) is handled;
// only the head dimension must be contiguous, which ExecuTorch's dense tensors always give.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "float8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace bibo {
namespace {

using executorch::aten::BFloat16;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// Element [i0, i1, i2, 0] of a 4-D tensor, whatever its dim order; with T = char and strides
// in bytes, for code that copies rows whatever their element type.
template <typename T>
struct Strided4d {
  T* data;
  int64_t s0, s1, s2;

  T* at(int64_t i0, int64_t i1, int64_t i2) const { return data + i0 * s0 + i1 * s1 + i2 * s2; }
};

template <typename T>
Strided4d<T> strided(T* data, const Tensor& t, int64_t unit = 1) {
  return {data, t.strides()[0] * unit, t.strides()[1] * unit, t.strides()[2] * unit};
}

bool check_cache_call(const Tensor& heads, const Tensor& cache, int64_t start, int64_t length,
                      const char* op) {
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      heads.dim() == 4 && cache.dim() == 4 && heads.strides()[3] == 1 &&
          cache.strides()[3] == 1,
      "%s: tensors must be 4-D with a contiguous head dim", op);
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      heads.scalar_type() == cache.scalar_type() &&
          (cache.scalar_type() == ScalarType::Float ||
           cache.scalar_type() == ScalarType::BFloat16),
      "%s: tensors must all be float32 or all bfloat16", op);
  ET_LOG_MSG_AND_RETURN_IF_FALSE(
      heads.size(0) == cache.size(0) && heads.size(3) == cache.size(3),
      "%s: batch and head size must match the cache's [B, G, max_len, d]", op);
  ET_LOG_MSG_AND_RETURN_IF_FALSE(start >= 0 && start + length <= cache.size(2),
                                 "%s: slots %lld .. %lld outside the cache's %lld", op,
                                 static_cast<long long>(start),
                                 static_cast<long long>(start + length - 1),
                                 static_cast<long long>(cache.size(2)));
  return true;
}

// Rows are copied as bytes: the same code serves every element type.
Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache,
                         int64_t start, Tensor& out) {
  ET_KERNEL_CHECK(ctx, check_cache_call(value, cache, start, value.size(2), "bibo::update_cache"),
                  InvalidArgument, out);
  ET_KERNEL_CHECK(ctx, value.size(1) == cache.size(1), InvalidArgument, out);
  const int64_t batch = value.size(0), kv_heads = value.size(1), length = value.size(2);
  const int64_t element = value.element_size(), row_bytes = value.size(3) * element;
  const auto src = strided(static_cast<const char*>(value.const_data_ptr()), value, element);
  const auto dst = strided(static_cast<char*>(cache.mutable_data_ptr()), cache, element);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t t = 0; t < length; ++t) {
        std::memcpy(dst.at(b, g, start + t), src.at(b, g, t), row_bytes);
      }
    }
  }
  return out;  // [1], its value unused: the cache is the result
}

inline float dot_row(const float* a, const float* b, int64_t n) { return dot(a, b, n); }

inline float dot_row(const BFloat16* a, const BFloat16* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return s;
}

// One query row over its visible slots: scores, a softmax shifted by their maximum (no
// overflow), then the probability-weighted sum of the value rows, accumulated in float.
template <typename T>
void attend_row(const T* q, const Strided4d<const T>& k, const Strided4d<const T>& v, int64_t b,
                int64_t g, int64_t visible, int64_t d, float scale, float* scores, float* sum,
                T* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < visible; ++s) {
    scores[s] = scale * dot_row(q, k.at(b, g, s), d);
    top = std::max(top, scores[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < visible; ++s) {
    scores[s] = std::exp(scores[s] - top);
    total += scores[s];
  }
  std::fill(sum, sum + d, 0.f);
  for (int64_t s = 0; s < visible; ++s) {
    const float p = scores[s] / total;
    const T* row = v.at(b, g, s);
    for (int64_t i = 0; i < d; ++i) sum[i] += p * static_cast<float>(row[i]);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(sum[i]);
}

template <typename T>
void attend(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t start,
            float scale, Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), d = q.size(3);
  const auto qs = strided(q.const_data_ptr<T>(), q);
  const auto k = strided(k_cache.const_data_ptr<T>(), k_cache);
  const auto v = strided(v_cache.const_data_ptr<T>(), v_cache);
  T* y = out.mutable_data_ptr<T>();
  const int64_t group = heads / k_cache.size(1), rows = batch * heads * length;
  // Rows (b, h, t) are independent: a prefill spreads them over ExecuTorch's threadpool; a
  // decode step's few short rows stay on the calling thread.
  const int64_t threads = std::max<int64_t>(1, executorch::extension::get_thread_count());
  const bool small = rows * (start + length) * d < (int64_t{1} << 16);
  const int64_t grain = small ? rows : (rows + threads - 1) / threads;
  executorch::extension::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scores(start + length), sum(d);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % length, h = (r / length) % heads, b = r / (length * heads);
      attend_row(qs.at(b, h, t), k, v, b, h / group, start + t + 1, d, scale, scores.data(),
                 sum.data(), y + ((b * length + t) * heads + h) * d);
    }
  });
}

Tensor& cache_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache,
                            const Tensor& v_cache, int64_t start, double scale, Tensor& out) {
  const char* op = "bibo::cache_attention";
  ET_KERNEL_CHECK(ctx,
                  check_cache_call(q, k_cache, start, q.size(2), op) &&
                      check_cache_call(q, v_cache, start, q.size(2), op),
                  InvalidArgument, out);
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), d = q.size(3);
  const int64_t kv_heads = k_cache.size(1);
  ET_KERNEL_CHECK_MSG(ctx,
                      kv_heads > 0 && heads % kv_heads == 0 && v_cache.size(1) == kv_heads &&
                          out.scalar_type() == q.scalar_type(),
                      InvalidArgument, out, "%s: %lld query heads in %lld KV-head groups", op,
                      static_cast<long long>(heads), static_cast<long long>(kv_heads));
  const executorch::aten::SizesType sizes[3] = {
      static_cast<executorch::aten::SizesType>(batch),
      static_cast<executorch::aten::SizesType>(length),
      static_cast<executorch::aten::SizesType>(heads * d)};
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, 3}) == Error::Ok,
                  InvalidArgument, out);
  if (q.scalar_type() == ScalarType::Float) {
    attend<float>(q, k_cache, v_cache, start, static_cast<float>(scale), out);
  } else {
    attend<BFloat16>(q, k_cache, v_cache, start, static_cast<float>(scale), out);
  }
  return out;
}

}  // namespace
}  // namespace bibo

EXECUTORCH_LIBRARY(bibo, "update_cache.out", bibo::update_cache_out);
EXECUTORCH_LIBRARY(bibo, "cache_attention.out", bibo::cache_attention_out);
