/* duquant-jax's compiled helpers: weight tiles of 4- and 8-bit codes dequantized to
 * bfloat16 in one pass, and activations quantized per token in one pass.
 *
 * Built at first use by interop/compiled.py (cc -O3 -march=native -fopenmp) and
 * called through interop/native.py, which checks every operand first: these
 * functions trust their arguments (shapes, strides, bounds). No -ffast-math:
 * every float operation rounds as IEEE single precision, as torch's do.
 *
 * Every element is bf16(Q * s) rounded to nearest even, where s is the scale of
 * its group already rounded to bfloat16 and given here as float: the product of
 * a 4..8-bit integer and an 8-bit significand is exact in float, so the result
 * equals torch's bfloat16 `Q.to(bf16) * s.to(bf16)` bit for bit. Scales are finite
 * (QuantizedWeight validates them).
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

int duq_abi_version(void) { return 3; }

static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* int4pack tile: `bytes` holds n_blocks blocks of `block` rows, each (in, block/2) bytes
 * of offset nibbles Q + 8. lanes != 0: byte b holds row b (low nibble) and row b + block/2
 * (high); lanes == 0: rows 2b (low) and 2b + 1 (high).
 * scales_t: (groups, ld_s) float, column 0 the tile's first row; group: input columns per scale.
 * out: (in, n_blocks * block) bfloat16 bits, rows in natural order. */
void duq_dequant_int4pack(const uint8_t *bytes, int64_t n_blocks, int64_t in, int64_t block, int lanes,
                          const float *scales_t, int64_t ld_s, int64_t group, uint16_t *out, int threads) {
  const int64_t h = block / 2, n = n_blocks * block;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < in; ++j) {
    const float *s = scales_t + (j / group) * ld_s;
    uint16_t *o = out + j * n;
    for (int64_t k = 0; k < n_blocks; ++k) {
      const uint8_t *b = bytes + (k * in + j) * h;
      const float *sk = s + k * block;
      uint16_t *ok = o + k * block;
      if (lanes) {
        for (int64_t i = 0; i < h; ++i) {
          ok[i] = to_bf16((float)((int)(b[i] & 15) - 8) * sk[i]);
          ok[i + h] = to_bf16((float)((int)(b[i] >> 4) - 8) * sk[i + h]);
        }
      } else {
        for (int64_t i = 0; i < h; ++i) {
          ok[2 * i] = to_bf16((float)((int)(b[i] & 15) - 8) * sk[2 * i]);
          ok[2 * i + 1] = to_bf16((float)((int)(b[i] >> 4) - 8) * sk[2 * i + 1]);
        }
      }
    }
  }
}

/* SPEC nibbles: packed (rows, h) bytes, column 2c in the low nibble of byte c, 2c + 1 in the high
 * one, two's complement. scales: (rows, groups) float. out: (rows, in) bfloat16 bits. */
void duq_dequant_nibbles(const uint8_t *packed, int64_t rows, int64_t h, int64_t in, const float *scales,
                         int64_t groups, int64_t group, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t *p = packed + r * h;
    const float *s = scales + r * groups;
    uint16_t *o = out + r * in;
    for (int64_t c0 = 0; c0 < in; c0 += group) {
      const int64_t c1 = c0 + group < in ? c0 + group : in;
      const float sg = s[c0 / group];
      int64_t c = c0;
      if ((c0 & 1) == 0) { /* whole bytes: both nibbles at once (a loop that vectorizes) */
        const int64_t pairs = (c1 - c0) / 2;
        const uint8_t *pb = p + c0 / 2;
        uint16_t *oc = o + c0;
        for (int64_t i = 0; i < pairs; ++i) {
          oc[2 * i] = to_bf16((float)(((pb[i] & 15) ^ 8) - 8) * sg);
          oc[2 * i + 1] = to_bf16((float)(((pb[i] >> 4) ^ 8) - 8) * sg);
        }
        c = c0 + 2 * pairs;
      }
      for (; c < c1; ++c) {
        const int nib = (p[c >> 1] >> ((c & 1) * 4)) & 15;
        o[c] = to_bf16((float)((nib ^ 8) - 8) * sg);
      }
    }
  }
}

/* int8 codes: (rows, in), scales (rows, groups) float -> out (rows, in) bfloat16 bits. */
void duq_dequant_int8(const int8_t *codes, int64_t rows, int64_t in, const float *scales, int64_t groups,
                      int64_t group, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t *q = codes + r * in;
    const float *s = scales + r * groups;
    uint16_t *o = out + r * in;
    for (int64_t c0 = 0; c0 < in; c0 += group) {
      const int64_t c1 = c0 + group < in ? c0 + group : in;
      const float sg = s[c0 / group];
      for (int64_t c = c0; c < c1; ++c) o[c] = to_bf16((float)q[c] * sg);
    }
  }
}

/* Per-token activation quantization, torch's arithmetic in the same order (interop.kernels.quantize_tokens):
 * dynamic: s_t = max((clip * max_j |x[t, j]|) / qa, 1e-8) (the clip product only when clip != 1);
 * static: s_t = *static_scale for every token. xq = clamp(round_half_even(x / s_t), -qa - 1, qa).
 * x: (tokens, n) with row stride ld, float32 (bf16 == 0) or bfloat16 bits (bf16 != 0).
 * xq: (tokens, n) int8, contiguous; s: (tokens,) float. A NaN quotient gives the code 0. */
static inline float load(const void *x, int bf16, int64_t i) {
  if (bf16) {
    uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return ((const float *)x)[i];
}

static inline int8_t to_code(float quotient, float lo, float hi) {
  float v = nearbyintf(quotient);
  v = v > hi ? hi : v;
  v = v < lo ? lo : v;
  return v == v ? (int8_t)v : 0;
}

/* The scale of one token from the max magnitude bits of its values (see duq_quantize_tokens). */
static inline float token_scale(uint32_t m, int dynamic, float clip, int qa, const float *static_scale) {
  if (!dynamic) return *static_scale;
  float st;
  if (m > 0x7F800000u) {
    st = NAN;
  } else {
    memcpy(&st, &m, 4);
  }
  if (clip != 1.0f) st = st * clip;
  st = st / (float)qa;
  return st < 1e-8f ? 1e-8f : st;
}

static inline uint32_t magnitude_bits(const void *x, int bf16, int64_t i) {
  if (bf16) return (uint32_t)(((const uint16_t *)x)[i] & 0x7FFFu) << 16;
  return ((const uint32_t *)x)[i] & 0x7FFFFFFFu;
}

void duq_quantize_tokens(const void *x, int bf16, int64_t tokens, int64_t n, int64_t ld, int dynamic, float clip,
                         int qa, const float *static_scale, int8_t *xq, float *s, int threads) {
  const float lo = (float)(-qa - 1), hi = (float)qa;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * n >= 65536)
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t row = t * ld;
    /* max |x| as the max of the magnitude bits, an integer reduction that vectorizes;
     * bits above those of infinity are a NaN, which makes the scale NaN (as torch's amax) */
    uint32_t m = 0;
    if (dynamic) {
      if (bf16) {
        const uint16_t *xb = (const uint16_t *)x + row;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t a = (uint32_t)(xb[j] & 0x7FFFu) << 16;
          m = a > m ? a : m;
        }
      } else {
        const uint32_t *xf = (const uint32_t *)x + row;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t a = xf[j] & 0x7FFFFFFFu;
          m = a > m ? a : m;
        }
      }
    }
    const float st = token_scale(m, dynamic, clip, qa, static_scale);
    s[t] = st;
    int8_t *q = xq + t * n;
    if (bf16) {
      const uint16_t *xb = (const uint16_t *)x + row;
      for (int64_t j = 0; j < n; ++j) q[j] = to_code(load(xb, 1, j) / st, lo, hi);
    } else {
      const float *xf = (const float *)x + row;
      for (int64_t j = 0; j < n; ++j) q[j] = to_code(xf[j] / st, lo, hi);
    }
  }
}

/* duq_quantize_tokens of x = xtᵀ, given xt: (n, tokens) with row stride ld (the transposed view
 * DuQuantLinear.rotate_input returns). Tokens are swept together in chunks (contiguous loads);
 * the codes go through a small tile to come out row-major, xq: (tokens, n). */
#define TOKENS_PER_CHUNK 64
#define CHANNELS_PER_TILE 64
void duq_quantize_tokens_t(const void *xt, int bf16, int64_t tokens, int64_t n, int64_t ld, int dynamic, float clip,
                           int qa, const float *static_scale, int8_t *xq, float *s, int threads) {
  const float lo = (float)(-qa - 1), hi = (float)qa;
  const int64_t chunks = (tokens + TOKENS_PER_CHUNK - 1) / TOKENS_PER_CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * n >= 65536)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * TOKENS_PER_CHUNK;
    const int64_t tb = tokens - t0 < TOKENS_PER_CHUNK ? tokens - t0 : TOKENS_PER_CHUNK;
    uint32_t m[TOKENS_PER_CHUNK] = {0};
    float st[TOKENS_PER_CHUNK];
    if (dynamic) {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t t = 0; t < tb; ++t) {
          const uint32_t a = magnitude_bits(xt, bf16, j * ld + t0 + t);
          m[t] = a > m[t] ? a : m[t];
        }
    }
    for (int64_t t = 0; t < tb; ++t) s[t0 + t] = st[t] = token_scale(m[t], dynamic, clip, qa, static_scale);
    int8_t tile[TOKENS_PER_CHUNK][CHANNELS_PER_TILE];
    for (int64_t j0 = 0; j0 < n; j0 += CHANNELS_PER_TILE) {
      const int64_t jb = n - j0 < CHANNELS_PER_TILE ? n - j0 : CHANNELS_PER_TILE;
      for (int64_t j = 0; j < jb; ++j)
        for (int64_t t = 0; t < tb; ++t) tile[t][j] = to_code(load(xt, bf16, (j0 + j) * ld + t0 + t) / st[t], lo, hi);
      for (int64_t t = 0; t < tb; ++t) memcpy(xq + (t0 + t) * n + j0, tile[t], (size_t)jb);
    }
  }
}
