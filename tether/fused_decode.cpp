// Fused CPU kernels for the rollout engine's decode step (tether/fused.py builds and loads
// them; tether/engine.py calls them as torch.ops.tether.*).
//
// Why: at 64 rows a SmolLM2 decode step is 121 small matmuls that oneDNN runs near the
// machine's rate, and ~1,300 elementwise ATen ops around them (norms, RoPE, cache writes,
// attention, SiLU) whose dispatch and memory passes cost as much as the matmuls. Each kernel
// below replaces one group of those ops (attention stays in ATen) with one pass over the data,
// and keeps the roundings of the ops it replaces: every intermediate the eager code holds in
// the compute dtype is rounded to it here too. RoPE and the cache writes are then the eager
// results bit for bit, and so is SiLU·up in bf16 (tested); the norm sums its squares in
// another order, so its float32 scale can differ in the last bit, which moves a rare output
// by one bf16 step.
//
// Types: float32 or bfloat16 tensors, contiguous, on the CPU. bf16 is handled as its bits
// (uint16) so that the loops vectorise: load = shift into a float's top half, store =
// round to nearest even, as c10::BFloat16 does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct F32 {
  using Storage = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};

struct BF16 {
  using Storage = uint16_t;
  static inline float load(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
  static inline uint16_t store(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    return static_cast<uint16_t>(bits >> 16);
  }
};

// e^x in float32 to about 2 ulp, in plain arithmetic so that loops over it vectorise (std::exp
// does not without -ffast-math): x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor
// polynomial, 2^n put into the exponent bits. Inputs are clamped to where e^x is a finite
// float: 0 below −87.3, at most ~3.4e38 above 88.7, so SiLU's g / (1 + e^−g) stays g for a
// large gate and ≈ 0 for a large negative one, as ATen's.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  // Round to nearest by adding and removing 1.5·2²³ (nearbyint would be a library call).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts (Cody-Waite)
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return x <= -87.3f ? 0.f : p * scale;
}

template <typename K>
inline float rounded(float v) {
  return K::load(K::store(v));
}

template <typename K>
typename K::Storage* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename K::Storage*>(t.data_ptr());
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ",
              dtype);
}

template <typename F>
void by_dtype(at::ScalarType dtype, F&& body) {
  if (dtype == at::kFloat) {
    body(F32{});
  } else if (dtype == at::kBFloat16) {
    body(BF16{});
  } else {
    TORCH_CHECK(false, "tether fused kernels take float32 or bfloat16, not ", dtype);
  }
}

// y = w · dtype(x · rsqrt(mean(x²) + eps)) over the last dimension, the mean in float32:
// Llama's RMSNorm with the same two roundings.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, "x", x.scalar_type());
  check(weight, "weight", x.scalar_type());
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.numel() == width, "weight has ", weight.numel(), " entries, x rows ", width);
  const int64_t rows = x.numel() / width;
  at::Tensor y = at::empty_like(x);
  by_dtype(x.scalar_type(), [&](auto kind) {
    using K = decltype(kind);
    const auto* xs = ptr<K>(x);
    const auto* ws = ptr<K>(weight);
    auto* ys = ptr<K>(y);
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto* row = xs + i * width;
        auto* out = ys + i * width;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < width; ++j) {
          const float v = K::load(row[j]);
          squares += v * v;
        }
        const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) +
                                             static_cast<float>(eps));
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          out[j] = K::store(K::load(ws[j]) * rounded<K>(K::load(row[j]) * scale));
        }
      }
    });
  });
  return y;
}

// One head's rotary embedding as HF's apply_rotary_pos_emb: x·cos + rotate_half(x)·sin,
// rotate_half(x) = cat(−x₂, x₁), each product and the sum rounded to the dtype.
template <typename K>
inline void rotate(const typename K::Storage* x, const typename K::Storage* cos,
                   const typename K::Storage* sin, typename K::Storage* out, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    out[j] = K::store(rounded<K>(K::load(x[j]) * K::load(cos[j])) +
                      rounded<K>(-K::load(x[j + half]) * K::load(sin[j])));
  }
#pragma omp simd
  for (int64_t j = half; j < dim; ++j) {
    out[j] = K::store(rounded<K>(K::load(x[j]) * K::load(cos[j])) +
                      rounded<K>(K::load(x[j - half]) * K::load(sin[j])));
  }
}

// From the fused projection qkv [B, S, (H + 2·Hkv)·D]: returns the rotated queries
// [B, H, S, D], and writes the rotated keys and the values into the caches [B, Hkv, T_max, D]
// at slots start … start + S − 1. cos, sin: [B, S, D].
at::Tensor rope_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor& keys, at::Tensor& values, int64_t heads, int64_t start) {
  const auto dtype = qkv.scalar_type();
  check(qkv, "qkv", dtype);
  check(cos, "cos", dtype);
  check(sin, "sin", dtype);
  check(keys, "keys", dtype);
  check(values, "values", dtype);
  const int64_t batch = qkv.size(0), steps = qkv.size(1);
  const int64_t kv_heads = keys.size(1), slots = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * dim, "qkv width does not match heads");
  TORCH_CHECK(keys.size(0) == batch && values.sizes() == keys.sizes(),
              "cache shape mismatch: keys and values must both be [B, Hkv, T_max, D]");
  TORCH_CHECK(start >= 0 && start + steps <= slots, "cache slots ", start, "+", steps,
              " out of ", slots);
  TORCH_CHECK(cos.numel() == batch * steps * dim && sin.numel() == cos.numel(),
              "cos/sin must be [B, S, D]");
  at::Tensor q = at::empty({batch, heads, steps, dim}, qkv.options());
  by_dtype(dtype, [&](auto kind) {
    using K = decltype(kind);
    const auto* src = ptr<K>(qkv);
    const auto* cs = ptr<K>(cos);
    const auto* sn = ptr<K>(sin);
    auto* qs = ptr<K>(q);
    auto* ks = ptr<K>(keys);
    auto* vs = ptr<K>(values);
    const int64_t width = qkv.size(2);
    at::parallel_for(0, batch * steps, 4, [&](int64_t begin, int64_t end) {
      for (int64_t bs = begin; bs < end; ++bs) {
        const int64_t b = bs / steps, s = bs % steps;
        const auto* row = src + bs * width;
        const auto* c = cs + bs * dim;
        const auto* n = sn + bs * dim;
        for (int64_t h = 0; h < heads; ++h) {
          rotate<K>(row + h * dim, c, n, qs + ((b * heads + h) * steps + s) * dim, dim);
        }
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t slot = ((b * kv_heads + h) * slots + start + s) * dim;
          rotate<K>(row + (heads + h) * dim, c, n, ks + slot, dim);
          std::memcpy(vs + slot, row + (heads + kv_heads + h) * dim,
                      dim * sizeof(typename K::Storage));
        }
      }
    });
  });
  return q;
}

// The gated MLP's activation: from gate_up [..., 2I] = [gate | up], returns
// dtype(silu(gate)) · up [..., I], rounded as F.silu(gate) * up is.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check(gate_up, "gate_up", gate_up.scalar_type());
  const int64_t width = gate_up.size(-1) / 2;
  TORCH_CHECK(gate_up.size(-1) == 2 * width, "gate_up's last dimension must be even");
  const int64_t rows = gate_up.numel() / (2 * width);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  at::Tensor out = at::empty(sizes, gate_up.options());
  by_dtype(gate_up.scalar_type(), [&](auto kind) {
    using K = decltype(kind);
    const auto* src = ptr<K>(gate_up);
    auto* dst = ptr<K>(out);
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto* gate = src + i * 2 * width;
        const auto* up = gate + width;
        auto* o = dst + i * width;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const float g = K::load(gate[j]);
          o[j] = K::store(rounded<K>(g / (1.f + fast_exp(-g))) * K::load(up[j]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tether, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def(
      "rope_into_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "int heads, int start) -> Tensor",
      &rope_into_cache);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
}
