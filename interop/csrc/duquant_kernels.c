/* duquant-jax's compiled helpers: weight tiles of 4- and 8-bit codes dequantized to
 * bfloat16 in one pass, activations quantized per token in one pass, and the product
 * of int8 activations with 4- or 8-bit weight codes in the "panels" layout (AVX2 integer
 * multiply-adds: exact int32 sums per scale group, scaled in float32), and a layer's input
 * transform (smoothing, permutation, block rotation) fused with the per-token quantization.
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
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DUQ_PANELS_SIMD 1
#else
#define DUQ_PANELS_SIMD 0
#endif

int duq_abi_version(void) { return 5; }

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

/* -- W4A8 and W8A8 products on the "panels" layout ---------------------------------------------
 * Codes in panels of 16 rows (interop.panels), per step s of 4 input columns (in/4 steps):
 * - 4-bit: 32 bytes per step; byte 4r + c holds u(16p + r, 4s + c) in its low nibble and
 *   u(16p + 8 + r, 4s + c) in its high nibble (r in 0..7, c in 0..3); u = Q + 8 in 0..15.
 * - 8-bit: 64 bytes per step; byte 4r + c of the first 32 holds u(16p + r, 4s + c), of the next 32
 *   u(16p + 8 + r, 4s + c); u = Q + 128 in 0..255, multiplied as 16 * (u >> 4) + (u & 15).
 *
 * y[t, n] = s_t[t] * sum_g s_w[n, g] * (sum_{k in g} u[n, k] xq[t, k] - o sum_{k in g} xq[t, k])
 *        = s_t[t] * sum_g s_w[n, g] * sum_{k in g} Q[n, k] xq[t, k]          (o = 8 or 128),
 * every group's integer sum exact (int32), the groups summed in float32 in order (one fused
 * multiply-add each), then times s_t[t]. The AVX2 form multiplies 4-bit unsigned values by signed
 * activations in pairs (vpmaddubsw: |pair| <= 2 * 15 * 128 = 3840) and adds at most 8 such
 * int16 terms (30720 < 32767) before widening to int32, so nothing saturates; int32 holds a group's
 * sum of 8-bit codes for groups of at most 65536 columns (65536 * 255 * 128 < 2^31; interop.native checks).
 * Blocking: input columns in blocks of whole groups (about BLOCK_COLUMNS; one block, the whole row, when
 * tokens x in <= SMALL_ACTIVATIONS), tokens in blocks of BLOCK_TOKENS, so that a block of activations stays
 * in cache while every panel passes over it; the partial sums of a token wait in y between column blocks.
 * The scales are read as (groups, 16) per panel: laid out once per column block for all panels when there
 * are several token blocks, else per panel by the thread that multiplies it, just before (its next panel's
 * scales prefetched), so that decode reads each scale once from memory. A token's result does not depend
 * on the blocking or on the other tokens of the call (the same operations in the same order).
 * xq: (tokens, in) int8, contiguous; s_t: (tokens,) float; scales: (out, groups) float, contiguous;
 * y: (tokens, out) float32, contiguous. Needs in % 4 == 0, group % 4 == 0, out % 16 == 0
 * (checked by interop.native). Returns 0, or -1 when its scratch memory could not be allocated. */
int duq_panels_simd(void) { return DUQ_PANELS_SIMD; }

#define PANEL_ROWS 16
#ifndef PANEL_TOKENS
#define PANEL_TOKENS 3      /* tokens per register block of 4-bit codes (the tails below handle fewer than 4) */
#endif
#define PANEL_TOKENS_8 2    /* of 8-bit codes: twice the int16 sums per token */
#define INT16_STEPS 8       /* steps of 4 columns added in int16 before widening */
#ifndef BLOCK_COLUMNS
#define BLOCK_COLUMNS 2048  /* input columns per cache block (whole groups; one group if larger) */
#endif
#ifndef SMALL_ACTIVATIONS
#define SMALL_ACTIVATIONS 65536 /* tokens x in at most this: no column blocks (the activations stay in cache anyway) */
#endif
#ifndef BLOCK_TOKENS
#define BLOCK_TOKENS 64     /* tokens per cache block */
#endif

/* What one register block needs: the column block [g0, g1) of groups, whether it is the first and last. */
typedef struct {
  const int8_t *xq;
  const float *s_t;
  const int32_t *xsum; /* (tokens, groups): o * sum of xq over each group */
  float *y;
  int64_t in, out, group, groups, g0, g1;
  int first, last;
} panel_job;

#if DUQ_PANELS_SIMD
/* mr (1..3, a constant after inlining) tokens t0.. against panel rows n0..n0+15, codes of `bits8` ? 8 : 4
 * bits; wp: the panel's bytes, sp: its scales as (groups, 16). */
static inline __attribute__((always_inline)) void panel_block(const int bits8, const int mr, const panel_job *j, int64_t t0,
                                                              const uint8_t *wp, const float *sp, int64_t n0) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  const int64_t steps = j->in / 4, gsteps = j->group / 4, stride = bits8 ? 64 : 32;
  const uint8_t *xr[3];
  __m256 facc[3][2];
  for (int m = 0; m < mr; ++m) {
    xr[m] = (const uint8_t *)(j->xq + (t0 + m) * j->in);
    float *yr = j->y + (t0 + m) * j->out + n0;
    facc[m][0] = j->first ? _mm256_setzero_ps() : _mm256_loadu_ps(yr);
    facc[m][1] = j->first ? _mm256_setzero_ps() : _mm256_loadu_ps(yr + 8);
  }
  for (int64_t g = j->g0; g < j->g1; ++g) {
    const int64_t s0 = g * gsteps, s1 = s0 + gsteps < steps ? s0 + gsteps : steps;
    __m256i acc[3][2]; /* the group's int32 sums */
    for (int m = 0; m < mr; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t c0 = s0; c0 < s1; c0 += INT16_STEPS) {
      const int64_t c1 = c0 + INT16_STEPS < s1 ? c0 + INT16_STEPS : s1;
      __m256i lo[3][2], hi[3][2]; /* int16 sums of the 4-bit values (8-bit: of their low and high halves) */
      for (int m = 0; m < mr; ++m) lo[m][0] = lo[m][1] = hi[m][0] = hi[m][1] = _mm256_setzero_si256();
      for (int64_t s = c0; s < c1; ++s) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(wp + s * stride));
        const __m256i w0 = _mm256_and_si256(b, mask), w1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        __m256i v0 = w0, v1 = w1;
        if (bits8) { /* w0, w1: low and high halves of rows 0-7; v0, v1: of rows 8-15 */
          const __m256i b2 = _mm256_loadu_si256((const __m256i *)(wp + s * stride + 32));
          v0 = _mm256_and_si256(b2, mask);
          v1 = _mm256_and_si256(_mm256_srli_epi16(b2, 4), mask);
        }
        for (int m = 0; m < mr; ++m) {
          int32_t x4;
          memcpy(&x4, xr[m] + 4 * s, 4);
          const __m256i x = _mm256_set1_epi32(x4);
          if (bits8) {
            lo[m][0] = _mm256_add_epi16(lo[m][0], _mm256_maddubs_epi16(w0, x));
            hi[m][0] = _mm256_add_epi16(hi[m][0], _mm256_maddubs_epi16(w1, x));
            lo[m][1] = _mm256_add_epi16(lo[m][1], _mm256_maddubs_epi16(v0, x));
            hi[m][1] = _mm256_add_epi16(hi[m][1], _mm256_maddubs_epi16(v1, x));
          } else {
            lo[m][0] = _mm256_add_epi16(lo[m][0], _mm256_maddubs_epi16(w0, x));
            lo[m][1] = _mm256_add_epi16(lo[m][1], _mm256_maddubs_epi16(w1, x));
          }
        }
      }
      for (int m = 0; m < mr; ++m)
        for (int h = 0; h < 2; ++h) {
          __m256i wide = _mm256_madd_epi16(lo[m][h], ones);
          if (bits8) wide = _mm256_add_epi32(wide, _mm256_madd_epi16(hi[m][h], sixteen));
          acc[m][h] = _mm256_add_epi32(acc[m][h], wide);
        }
    }
    const __m256 S0 = _mm256_loadu_ps(sp + g * PANEL_ROWS), S1 = _mm256_loadu_ps(sp + g * PANEL_ROWS + 8);
    for (int m = 0; m < mr; ++m) {
      const __m256i off = _mm256_set1_epi32(j->xsum[(t0 + m) * j->groups + g]);
      facc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][0], off)), S0, facc[m][0]);
      facc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][1], off)), S1, facc[m][1]);
    }
  }
  for (int m = 0; m < mr; ++m) {
    float *yr = j->y + (t0 + m) * j->out + n0;
    if (j->last) {
      const __m256 st = _mm256_set1_ps(j->s_t[t0 + m]);
      facc[m][0] = _mm256_mul_ps(facc[m][0], st);
      facc[m][1] = _mm256_mul_ps(facc[m][1], st);
    }
    _mm256_storeu_ps(yr, facc[m][0]);
    _mm256_storeu_ps(yr + 8, facc[m][1]);
  }
}
#else
/* The same arithmetic in plain C, in the same order (no AVX2 here: interop.kernels does not offer the
 * path; the library's self-check still compares it with a float64 product). */
static void panel_block(const int bits8, const int mr, const panel_job *j, int64_t t0, const uint8_t *wp, const float *sp,
                        int64_t n0) {
  for (int m = 0; m < mr; ++m) {
    const int8_t *x = j->xq + (t0 + m) * j->in;
    float *yr = j->y + (t0 + m) * j->out + n0;
    for (int i = 0; i < PANEL_ROWS; ++i) {
      const int r = i % 8, half = i / 8;
      float f = j->first ? 0.0f : yr[i];
      for (int64_t g = j->g0; g < j->g1; ++g) {
        const int64_t k1 = (g + 1) * j->group < j->in ? (g + 1) * j->group : j->in;
        int32_t sum = 0;
        for (int64_t k = g * j->group; k < k1; ++k) {
          const int u = bits8 ? wp[(k / 4) * 64 + half * 32 + 4 * r + k % 4] : (wp[(k / 4) * 32 + 4 * r + k % 4] >> (4 * half)) & 15;
          sum += u * (int32_t)x[k];
        }
        f = fmaf((float)(sum - j->xsum[(t0 + m) * j->groups + g]), sp[g * PANEL_ROWS + i], f);
      }
      yr[i] = j->last ? f * j->s_t[t0 + m] : f;
    }
  }
}
#endif

/* One column block of tokens b0..b1 against panel p; mr-token register blocks, then the tail. */
static inline __attribute__((always_inline)) void panel_tokens(const int bits8, const panel_job *job, int64_t b0, int64_t b1,
                                                               const uint8_t *wp, const float *sp, int64_t n0) {
  const int block = bits8 ? PANEL_TOKENS_8 : PANEL_TOKENS;
  int64_t t0 = b0;
  for (; t0 + block <= b1; t0 += block) {
    if (block == 3) panel_block(bits8, 3, job, t0, wp, sp, n0);
    else panel_block(bits8, 2, job, t0, wp, sp, n0);
  }
  switch (b1 - t0) { /* the last tokens, fewer than the block */
    case 2: panel_block(bits8, 2, job, t0, wp, sp, n0); break;
    case 1: panel_block(bits8, 1, job, t0, wp, sp, n0); break;
    default: break;
  }
}

/* The scales of panel p, groups g0..g0+ng, as (ng, 16): dst[g * 16 + i] = scales[(16 p + i) * groups + g0 + g]
 * (a copy: the same values in another order). AVX2: 8 x 8 tiles transposed in registers. */
static void panel_scales(const float *scales, int64_t groups, int64_t p, int64_t g0, int64_t ng, float *restrict dst) {
  const float *base = scales + p * PANEL_ROWS * groups + g0;
  int64_t g = 0;
#if DUQ_PANELS_SIMD
  for (; g + 8 <= ng; g += 8)
    for (int h = 0; h < 2; ++h) {
      const float *r = base + 8 * h * groups + g;
      __m256 a0 = _mm256_loadu_ps(r), a1 = _mm256_loadu_ps(r + groups), a2 = _mm256_loadu_ps(r + 2 * groups),
             a3 = _mm256_loadu_ps(r + 3 * groups), a4 = _mm256_loadu_ps(r + 4 * groups), a5 = _mm256_loadu_ps(r + 5 * groups),
             a6 = _mm256_loadu_ps(r + 6 * groups), a7 = _mm256_loadu_ps(r + 7 * groups);
      const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1), t2 = _mm256_unpacklo_ps(a2, a3),
                   t3 = _mm256_unpackhi_ps(a2, a3), t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5),
                   t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE), u2 = _mm256_shuffle_ps(t1, t3, 0x44),
                   u3 = _mm256_shuffle_ps(t1, t3, 0xEE), u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float *d = dst + g * PANEL_ROWS + 8 * h; /* column k of the tile (group g + k) holds rows 8h..8h+7 */
      _mm256_storeu_ps(d + 0 * PANEL_ROWS, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + 1 * PANEL_ROWS, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * PANEL_ROWS, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * PANEL_ROWS, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * PANEL_ROWS, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * PANEL_ROWS, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * PANEL_ROWS, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * PANEL_ROWS, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
#endif
  for (; g < ng; ++g)
    for (int i = 0; i < PANEL_ROWS; ++i) dst[g * PANEL_ROWS + i] = base[i * groups + g];
}

static int panels_product(const int bits8, const int8_t *xq, const float *s_t, int64_t tokens, int64_t in, const uint8_t *panels,
                          const float *scales, int64_t out, int64_t group, float *y, int threads) {
  const int64_t groups = (in + group - 1) / group, n_panels = out / PANEL_ROWS;
  /* Few activations (decode): one column block, the whole row, so that each panel's codes and scales are read
   * in one sweep each. The float sums run in the same order whatever the blocking. */
  const int64_t block_groups = tokens * in <= SMALL_ACTIVATIONS ? groups : group < BLOCK_COLUMNS ? BLOCK_COLUMNS / group : 1;
  const int64_t panel_bytes = (in / 4) * (bits8 ? 64 : 32);
  const int32_t offset = bits8 ? 128 : 8;
  const int64_t max_ng = block_groups < groups ? block_groups : groups;
  /* One token block (decode, short prompts): each scale is used by one register block, so each thread lays out
   * the scales of the panel it is about to multiply in its own small buffer (L1-resident), instead of a pass
   * over every panel's scales that writes and rereads them through memory. More tokens: one shared layout per
   * column block, reused by every token block. The arithmetic is the same either way. */
  if (threads < 1) threads = 1; /* the team size, which also sizes the per-thread scale buffers below */
  const int local = tokens <= BLOCK_TOKENS;
  const int64_t sps_panels = local ? threads : n_panels;
  int32_t *xsum = (int32_t *)malloc((size_t)(tokens * groups > 0 ? tokens * groups : 1) * sizeof(int32_t));
  float *sps = (float *)malloc((size_t)sps_panels * (size_t)max_ng * PANEL_ROWS * sizeof(float));
  if (!xsum || !sps) {
    free(xsum);
    free(sps);
    return -1;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k1 = (g + 1) * group < in ? (g + 1) * group : in;
        int32_t sum = 0;
        for (int64_t k = g * group; k < k1; ++k) sum += xq[t * in + k];
        xsum[t * groups + g] = offset * sum;
      }
#ifdef _OPENMP
    float *mine = sps + (int64_t)omp_get_thread_num() * max_ng * PANEL_ROWS; /* local: this thread's panel scales */
#else
    float *mine = sps;
#endif
    for (int64_t g0 = 0; g0 < groups; g0 += block_groups) {
      const int64_t g1 = g0 + block_groups < groups ? g0 + block_groups : groups, ng = g1 - g0;
      if (!local) { /* every panel's scales of this column block as (ng, 16), panel by panel */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < n_panels; ++p) panel_scales(scales, groups, p, g0, ng, sps + p * ng * PANEL_ROWS);
      }
      for (int64_t b0 = 0; b0 < tokens; b0 += BLOCK_TOKENS) {
        const int64_t b1 = b0 + BLOCK_TOKENS < tokens ? b0 + BLOCK_TOKENS : tokens;
        const panel_job job = {xq, s_t, xsum, y, in, out, group, groups, g0, g1, g0 == 0, g1 == groups};
#pragma omp for schedule(static)
        for (int64_t p = 0; p < n_panels; ++p) {
          if (local) { /* one token block: this panel's, just before use; the next panel's on their way */
            panel_scales(scales, groups, p, g0, ng, mine);
#if DUQ_PANELS_SIMD
            if (p + 1 < n_panels)
              for (int i = 0; i < PANEL_ROWS; ++i) {
                const char *r = (const char *)(scales + ((p + 1) * PANEL_ROWS + i) * groups + g0);
                for (int64_t k = 0; k < ng * 4; k += 64) _mm_prefetch(r + k, _MM_HINT_T0);
              }
#endif
          }
          const float *sp = (local ? mine - g0 * PANEL_ROWS : sps + (p * ng - g0) * PANEL_ROWS); /* by absolute group */
          if (bits8) panel_tokens(1, &job, b0, b1, panels + p * panel_bytes, sp, p * PANEL_ROWS);
          else panel_tokens(0, &job, b0, b1, panels + p * panel_bytes, sp, p * PANEL_ROWS);
        }
      }
    }
  }
  free(xsum);
  free(sps);
  return 0;
}

int duq_w4a8_panels(const int8_t *xq, const float *s_t, int64_t tokens, int64_t in, const uint8_t *panels,
                    const float *scales, int64_t out, int64_t group, float *y, int threads) {
  return panels_product(0, xq, s_t, tokens, in, panels, scales, out, group, y, threads);
}

int duq_w8a8_panels(const int8_t *xq, const float *s_t, int64_t tokens, int64_t in, const uint8_t *panels,
                    const float *scales, int64_t out, int64_t group, float *y, int threads) {
  return panels_product(1, xq, s_t, tokens, in, panels, scales, out, group, y, threads);
}

/* -- The input transform and the per-token quantization in one pass ---------------------------------
 * DuQuantLinear.rotate_input without a pre-rotation, then duq_quantize_tokens, for float32 x:
 *   xp[j] = x[t, perm[j]] * diag[perm[j]]                 (diag NULL: no smoothing)
 *   x2[b B + c] = sum_{k < B} xp[b B + k] * R_b[k, c]       (rot NULL: x2 = xp; past n, xp reads 0)
 * with R_b = rot[n_rot == 1 ? 0 : b] (B x B, row-major), the k-sum in order in float32 (fused
 * multiply-adds), then xq[t] and s[t] as duq_quantize_tokens makes them from x2[t, :n].
 * x: (tokens, n) rows ld apart; perm: (n,) int64; xq: (tokens, n) int8; s: (tokens,) float.
 * Returns 0; -1 if scratch memory could not be allocated; -2 if an index of perm lies outside [0, n)
 * (checked here, before anything is read: interop.native checks it too, when the layer is bound). */
#define TRANSFORM_TOKENS 4

/* o[i] = sum_{k < B} a[k] * R[k, i] for i < B, each sum from 0 in k order with one fused multiply-add per term:
 * the AVX2 form keeps 32 outputs in registers over the whole k loop (the plain loop stores every partial sum),
 * with the same operations in the same order, so both give the same bits. */
static void rotate_block(const float *restrict a, const float *restrict R, int64_t B, float *restrict o) {
  int64_t i = 0;
#if DUQ_PANELS_SIMD
  for (; i + 32 <= B; i += 32) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < B; ++k) {
      const __m256 ak = _mm256_broadcast_ss(a + k);
      const float *r = R + k * B + i;
      c0 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(r), c0);
      c1 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(r + 8), c1);
      c2 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(r + 16), c2);
      c3 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(r + 24), c3);
    }
    _mm256_storeu_ps(o + i, c0);
    _mm256_storeu_ps(o + i + 8, c1);
    _mm256_storeu_ps(o + i + 16, c2);
    _mm256_storeu_ps(o + i + 24, c3);
  }
  for (; i + 8 <= B; i += 8) {
    __m256 c = _mm256_setzero_ps();
    for (int64_t k = 0; k < B; ++k) c = _mm256_fmadd_ps(_mm256_broadcast_ss(a + k), _mm256_loadu_ps(R + k * B + i), c);
    _mm256_storeu_ps(o + i, c);
  }
#endif
  for (; i < B; ++i) {
    float c = 0.0f;
    for (int64_t k = 0; k < B; ++k) c = fmaf(a[k], R[k * B + i], c);
    o[i] = c;
  }
}
typedef struct {
  const float *x, *diag, *rot;
  const int64_t *perm;
  int64_t tokens, n, ld, n_rot, B, n_blocks, padded;
  int dynamic, qa;
  float clip;
  const float *static_scale;
  int8_t *xq;
  float *s;
} transform_job;

/* Tokens [c * TRANSFORM_TOKENS, ...) of duq_transform_quantize, with `xp`: 2 * TRANSFORM_TOKENS * padded floats. */
static void transform_chunk(const transform_job *j, int64_t c, float *xp) {
  const int64_t n = j->n, padded = j->padded, B = j->B;
  float *x2 = xp + TRANSFORM_TOKENS * padded;
  const int64_t t0 = c * TRANSFORM_TOKENS;
  const int64_t tb = j->tokens - t0 < TRANSFORM_TOKENS ? j->tokens - t0 : TRANSFORM_TOKENS;
  const float lo = (float)(-j->qa - 1), hi = (float)j->qa;
  for (int64_t t = 0; t < tb; ++t) {
    const float *row = j->x + (t0 + t) * j->ld;
    float *p = (j->rot ? xp : x2) + t * padded;
    if (j->diag)
      for (int64_t i = 0; i < n; ++i) p[i] = row[j->perm[i]] * j->diag[j->perm[i]];
    else
      for (int64_t i = 0; i < n; ++i) p[i] = row[j->perm[i]];
    for (int64_t i = n; i < padded; ++i) p[i] = 0.0f;
  }
  if (j->rot)
    for (int64_t b = 0; b < j->n_blocks; ++b) {
      const float *R = j->rot + (j->n_rot == 1 ? 0 : b) * B * B;
      for (int64_t t = 0; t < tb; ++t) rotate_block(xp + t * padded + b * B, R, B, x2 + t * padded + b * B);
    }
  for (int64_t t = 0; t < tb; ++t) {
    const float *v = x2 + t * padded;
    uint32_t m = 0;
    if (j->dynamic)
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t a = magnitude_bits(v, 0, i);
        m = a > m ? a : m;
      }
    const float st = token_scale(m, j->dynamic, j->clip, j->qa, j->static_scale);
    j->s[t0 + t] = st;
    int8_t *q = j->xq + (t0 + t) * n;
    for (int64_t i = 0; i < n; ++i) q[i] = to_code(v[i] / st, lo, hi);
  }
}

int duq_transform_quantize(const float *x, int64_t tokens, int64_t n, int64_t ld, const float *diag, const int64_t *perm,
                           const float *rot, int64_t n_rot, int64_t block, int dynamic, float clip, int qa,
                           const float *static_scale, int8_t *xq, float *s, int threads) {
  for (int64_t i = 0; i < n; ++i)
    if (perm[i] < 0 || perm[i] >= n) return -2;
  const int64_t B = rot ? block : n, n_blocks = (n + B - 1) / B;
  const transform_job job = {x, diag, rot, perm, tokens, n, ld, n_rot, B, n_blocks, n_blocks * B, dynamic, qa, clip,
                             static_scale, xq, s};
  const int64_t chunks = (tokens + TRANSFORM_TOKENS - 1) / TRANSFORM_TOKENS;
  const int team = threads > 1 && chunks > 1 && tokens * n * B >= (1 << 20) ? threads : 1;
  const size_t per_thread = (size_t)(2 * TRANSFORM_TOKENS * job.padded);
  float *scratch = (float *)malloc(per_thread * (size_t)team * sizeof(float));
  if (!scratch) return -1;
  if (team == 1) { /* one token (decode) and small calls: no thread team to wake */
    for (int64_t c = 0; c < chunks; ++c) transform_chunk(&job, c, scratch);
  } else {
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
#ifdef _OPENMP
      transform_chunk(&job, c, scratch + per_thread * (size_t)omp_get_thread_num());
#else
      transform_chunk(&job, c, scratch);
#endif
    }
  }
  free(scratch);
  return 0;
}
