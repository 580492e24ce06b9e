// Fused CPU kernels for the rollout engine's decode step (tether/fast/fused.py builds and
// loads them; tether/fast/engine.py calls them as torch.ops.tether.*).
//
// Why: at 64 rows a SmolLM2 decode step is 121 small matmuls that oneDNN runs near the
// machine's rate, and ~1,300 elementwise ATen ops around them (norms, RoPE, cache writes,
// attention, SiLU) whose dispatch and memory passes cost as much as the matmuls. Each kernel
// below replaces one group of those ops with one pass over the data. The norm, RoPE and
// SiLU·up keep the roundings of the ops they replace: every intermediate the eager code holds
// in the compute dtype is rounded to it here too. RoPE and the cache writes are then the
// eager results bit for bit, and so is SiLU·up in bf16 (tested); the norm sums its squares
// in another order, so its float32 scale can differ in the last bit, which moves a rare
// output by one bf16 step. Decode attention keeps its scores in float32 where the eager code
// rounds them to the dtype: it is the more exact of the two (tested against float64).
//
// Types: float32 or bfloat16 tensors, contiguous, on the CPU. bf16 is handled as its bits
// (uint16) so that the loops vectorise: load = shift into a float's top half, store =
// round to nearest even, as c10::BFloat16 does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
__attribute__((always_inline)) inline float fast_exp(float x) {
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

// Decode attention for ONE query per row, the query heads grouped by their KV head:
// out[b, h] = Σ_t softmax_t(q[b, h]·k[b, g, t] · scale + bias[b, t]) v[b, g, t], g = h / rep,
// over the cache's first `end` slots (slots from `end` on are not filled yet; their weight
// is 0). Replaces two batched matmuls, a scale, a mask add, a softmax and two casts, which
// at 64 rows ran at ~12 GFLOP/s because each matrix is a few kilobytes; and reads only the
// filled part of a cache laid out as the prefill's SDPA wants it.
//
// Rounding: the scores stay float32 (the eager code rounds them to the compute dtype before
// scaling: this is the more exact of the two), the softmax is float32 with `fast_exp`, the
// weights are rounded to the dtype as the eager code's cast does, and the weighted sum of
// values is accumulated in float32 and rounded once, as bmm does.
typedef float f32x16 __attribute__((vector_size(64)));

// a·b + c rounded once. The build turns off contraction (-ffp-contract=off) so that the
// kernels above round as ATen does; attention's dot products have no ATen rounding to keep,
// and a fused multiply-add is both faster and more exact there.
inline f32x16 fma16(f32x16 a, f32x16 b, f32x16 c) {
#ifdef __AVX512F__
  return _mm512_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x16 load16(const uint16_t* p) {
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u16x16 half;
  std::memcpy(&half, p, sizeof half);
  const u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Sums each of 8 vectors' lanes: [Σ a₀, …, Σ a₇] in lanes 0-7. Pairwise halving with
// shuffles (24 shuffles and 14 adds for 8 sums), where summing one vector's lanes in order
// would be 15 dependent adds for each.
inline f32x16 lane_sums8(const f32x16* a) {
  f32x16 b[4], c[2];
  for (int i = 0; i < 4; ++i)  // [x: 8 | y: 8] partials of keys 2i, 2i+1
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                   25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // 4 lanes per key
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  const f32x16 d =  // 2 lanes per key
      __builtin_shufflevector(c[0], c[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                              29) +
      __builtin_shufflevector(c[0], c[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                              31);
  return __builtin_shufflevector(d, d, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(d, d, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
}

constexpr int64_t kMaxRep = 8;  // query heads per KV head (a template argument)
constexpr int64_t kBlock = 8;   // keys scored together

// Elements of storage type T in one 64-byte cache line (the prefetches' stride).
template <typename T>
constexpr int64_t kLine = 64 / sizeof(T);

// The score row's length: `end` keys rounded up to whole blocks.
inline int64_t padded_keys(int64_t end) { return (end + kBlock - 1) / kBlock * kBlock; }

// One (row, KV head): its REP query heads against the first `end` keys. CHUNKS = D / 16.
// Compile-time REP and CHUNKS keep the accumulators (REP × 8 for the scores, REP × CHUNKS
// for the output) in vector registers.
template <typename K, int REP, int CHUNKS>
void attend_one_group(
    const typename K::Storage* q, const typename K::Storage* keys,
    const typename K::Storage* values, const float* bias, typename K::Storage* out,
    int64_t end, float scale, float* scores /* [REP, end rounded up to kBlock] */) {
  constexpr int64_t dim = CHUNKS * 16;
  const int64_t padded = padded_keys(end);
  f32x16 query[REP][CHUNKS];
  for (int r = 0; r < REP; ++r)
    for (int c = 0; c < CHUNKS; ++c) query[r][c] = load16(q + r * dim + c * 16);
  // The cache is read from memory, not from cache, at rollout sizes (a layer's filled keys
  // and values at 64 rows are megabytes), and one group's slots span a few 4 KiB pages, which
  // the hardware prefetcher does not cross: ask for the values now, into L2, while the keys
  // are scored, and for each key block two blocks ahead.
  constexpr int64_t line = kLine<typename K::Storage>;
  for (int64_t i = 0; i < end * dim; i += line) __builtin_prefetch(values + i, 0, 2);
  for (int64_t t0 = 0; t0 < end; t0 += kBlock) {
    f32x16 acc[REP][kBlock];
    const int64_t ahead = t0 + 2 * kBlock;
    for (int64_t i = ahead * dim; i < std::min(ahead + kBlock, end) * dim; i += line)
      __builtin_prefetch(keys + i, 0, 3);
    for (int j = 0; j < kBlock; ++j) {
      // Past `end` (the last block's tail) the key slot exists but is not filled: it is
      // scored and then given −inf below.
      const auto* key = keys + std::min(t0 + j, end - 1) * dim;
      f32x16 k[CHUNKS];
      for (int c = 0; c < CHUNKS; ++c) k[c] = load16(key + c * 16);
      for (int r = 0; r < REP; ++r) {
        acc[r][j] = query[r][0] * k[0];
        for (int c = 1; c < CHUNKS; ++c) acc[r][j] = fma16(query[r][c], k[c], acc[r][j]);
      }
    }
    for (int r = 0; r < REP; ++r) {
      const f32x16 sums = lane_sums8(acc[r]);
      for (int j = 0; j < kBlock; ++j) {
        const int64_t t = t0 + j;
        const float b = t < end ? bias[t] : -INFINITY;
        scores[r * padded + t] = std::isinf(b) ? -INFINITY : sums[j] * scale + b;
      }
    }
  }
  for (int r = 0; r < REP; ++r) {
    float* s = scores + r * padded;
    float top = -INFINITY;
    for (int64_t t = 0; t < end; ++t) top = std::max(top, s[t]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < end; ++t) {
      const float e = fast_exp(s[t] - top);  // 0 for a −inf score
      s[t] = e;
      total += e;
    }
    const float inverse = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < end; ++t) s[t] = rounded<K>(s[t] * inverse);
  }
  f32x16 acc[REP][CHUNKS] = {};
  for (int64_t t = 0; t < end; ++t) {
    const auto* value = values + t * dim;
    f32x16 v[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) v[c] = load16(value + c * 16);
    for (int r = 0; r < REP; ++r) {
      const f32x16 w = f32x16{} + scores[r * padded + t];
      for (int c = 0; c < CHUNKS; ++c) acc[r][c] = fma16(w, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < REP; ++r)
    for (int c = 0; c < CHUNKS; ++c)
      for (int l = 0; l < 16; ++l) out[r * dim + c * 16 + l] = K::store(acc[r][c][l]);
}

template <typename K, int CHUNKS, int REP = 1>
auto group_kernel(int64_t rep) {
  if constexpr (REP < kMaxRep) {
    if (rep != REP) return group_kernel<K, CHUNKS, REP + 1>(rep);
  }
  return &attend_one_group<K, REP, CHUNKS>;
}

template <typename K>
auto group_kernel_for(int64_t dim, int64_t rep) {
  switch (dim) {
    case 16: return group_kernel<K, 1>(rep);
    case 32: return group_kernel<K, 2>(rep);
    case 64: return group_kernel<K, 4>(rep);
    default: return group_kernel<K, 8>(rep);
  }
}

// q [B, H, 1, D]; keys, values [B, Hkv, T_max, D]; bias [B, T_max] float32 (0 for a visible
// key, −inf for padding); end: the slots filled. Returns [B, H, 1, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& bias, int64_t end, double scale) {
  const auto dtype = q.scalar_type();
  check(q, "q", dtype);
  check(keys, "keys", dtype);
  check(values, "values", dtype);
  check(bias, "bias", at::kFloat);
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "q must be [B, H, 1, D]: one query per row");
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(),
              "keys and values must both be [B, Hkv, T_max, D]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = keys.size(1), slots = keys.size(2);
  TORCH_CHECK(keys.size(0) == batch && keys.size(3) == dim, "keys do not match q's rows or D");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxRep,
              "query heads must be a multiple of KV heads, at most ", kMaxRep, " per KV head");
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128,
              "head dimension must be 16, 32, 64 or 128, not ", dim);
  TORCH_CHECK(bias.numel() == batch * slots, "bias must be [B, T_max]");
  TORCH_CHECK(end >= 1 && end <= slots, "end ", end, " out of 1..", slots);
  const int64_t rep = heads / kv_heads;
  at::Tensor out = at::empty_like(q);
  by_dtype(dtype, [&](auto kind) {
    using K = decltype(kind);
    const auto kernel = group_kernel_for<K>(dim, rep);
    const auto* qs = ptr<K>(q);
    const auto* ks = ptr<K>(keys);
    const auto* vs = ptr<K>(values);
    auto* os = ptr<K>(out);
    const float* bs = bias.data_ptr<float>();
    at::parallel_for(0, batch * kv_heads, 4, [&](int64_t begin, int64_t stop) {
      std::vector<float> scores(rep * padded_keys(end));
      for (int64_t bg = begin; bg < stop; ++bg) {
        if (bg + 1 < stop)  // the next group's first key blocks, which no block prefetched
          for (int64_t i = 0; i < std::min(2 * kBlock, end) * dim; i += kLine<typename K::Storage>)
            __builtin_prefetch(ks + (bg + 1) * slots * dim + i, 0, 2);
        const int64_t first = bg * rep * dim;  // query heads g·rep … of row b = bg / Hkv
        kernel(qs + first, ks + bg * slots * dim, vs + bg * slots * dim,
               bs + bg / kv_heads * slots, os + first, end, static_cast<float>(scale),
               scores.data());
      }
    });
  });
  return out;
}

// The sampler's unnormalised weights (tether/fast/engine.py `sample`): per row b,
// out[b, j] = e^(x_j − max_i x_i) with x = logits[b] / temperature in float32, for j < V, and
// the sums of each block of kDrawBlock entries, which `draw` searches first. Replaces a copy,
// a division, a max, a subtraction, an exp and a sum, each a pass over a [B, 49,152] float32
// buffer. The columns of `out` from V on are not written (the caller keeps them zero), and
// an entry of −inf gets weight 0. fast_exp is within ~2 ulp of ATen's exp.
constexpr int64_t kDrawBlock = 1024;  // engine.DRAW_BLOCK

// One row of `softmax_weights`; SCALED: divide by the temperature (a template argument, so
// that each loop is one straight vector loop).
template <typename K, bool SCALED>
void row_weights(const typename K::Storage* __restrict row, float* __restrict weights,
                 float* __restrict block_sums, int64_t vocab, float temperature) {
  // x / T as ATen's div_ rounds it: a division, not a multiplication by 1/T
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < vocab; ++j) {
    const float x = SCALED ? K::load(row[j]) / temperature : K::load(row[j]);
    top = std::max(top, x);
  }
  for (int64_t first = 0, block = 0; first < vocab; first += kDrawBlock, ++block) {
    const int64_t count = std::min(kDrawBlock, vocab - first);
    const auto* __restrict in = row + first;
    float* __restrict out = weights + first;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) {
      const float x = SCALED ? K::load(in[j]) / temperature : K::load(in[j]);
      const float w = fast_exp(x - top);  // 0 for x = −inf
      out[j] = w;
      total += w;
    }
    block_sums[block] = total;
  }
}

at::Tensor softmax_weights(const at::Tensor& logits, at::Tensor& out, double temperature) {
  check(logits, "logits", logits.scalar_type());
  check(out, "out", at::kFloat);
  TORCH_CHECK(logits.dim() == 2 && out.dim() == 2, "logits and out must be [B, V] and [B', W]");
  const int64_t batch = logits.size(0), vocab = logits.size(1), width = out.size(1);
  TORCH_CHECK(out.size(0) >= batch && width >= vocab && width % kDrawBlock == 0,
              "out must have at least logits' rows and its columns rounded up to ", kDrawBlock,
              " (", logits.sizes(), " into ", out.sizes(), ")");
  TORCH_CHECK(temperature > 0, "temperature must be positive, not ", temperature);
  const int64_t blocks = width / kDrawBlock;
  at::Tensor sums = at::zeros({batch, blocks}, out.options());
  by_dtype(logits.scalar_type(), [&](auto kind) {
    using K = decltype(kind);
    const auto kernel = temperature == 1.0 ? &row_weights<K, false> : &row_weights<K, true>;
    const auto* ls = ptr<K>(logits);
    float* os = out.data_ptr<float>();
    float* ss = sums.data_ptr<float>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t stop) {
      for (int64_t b = begin; b < stop; ++b)
        kernel(ls + b * vocab, os + b * width, ss + b * blocks, vocab,
               static_cast<float>(temperature));
    });
  });
  return sums;
}

}  // namespace

TORCH_LIBRARY(tether, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def(
      "rope_into_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "int heads, int start) -> Tensor",
      &rope_into_cache);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def(
      "decode_attention(Tensor q, Tensor keys, Tensor values, Tensor bias, int end, float scale) "
      "-> Tensor",
      &decode_attention);
  m.def("softmax_weights(Tensor logits, Tensor(a!) out, float temperature) -> Tensor",
        &softmax_weights);
}
