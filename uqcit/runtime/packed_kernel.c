/* The packed CPU kernel of uqcit.runtime.kernel (see its docstring): y = x @ W^T computed straight
   from the stored codes. Compiled once per source and flags into the workbench cache, loaded with
   ctypes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static float HALF[65536];
static int HALF_READY = 0;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  /* subnormal: normalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7F800000u | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
}

void uq_init(void) {
    if (HALF_READY) return;
    for (int i = 0; i < 65536; i++) HALF[i] = half_to_float((uint16_t)i);
    HALF_READY = 1;
}

/* Codes that straddle bytes: n chunks of P codes in B bytes from p (3 bits: 8 codes in 3 bytes,
   5 bits: 8 in 5, 6 bits: 4 in 3), code j of chunk i times xph[j * stride + c + i]. Called with
   constant widths, so each is inlined into its own unrolled loop. */
static inline float chunk_dot(const uint8_t *p, int bits, int per, int nb, int64_t n, const float *xph,
                              int64_t c, int64_t stride, float off) {
    const uint64_t mask = (1u << bits) - 1;
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        uint64_t w = 0;
        for (int b = 0; b < nb; b++) w |= (uint64_t)p[nb * i + b] << (8 * b);
        for (int j = 0; j < per; j++) acc += ((float)((w >> (bits * j)) & mask) - off) * xph[j * stride + c + i];
    }
    return acc;
}

/* (With AVX2 the 2- and 4-bit phase-layout rows go to the row-wise loops below: this is their
   portable form, and the 5- and 6-bit codes' only one.)
   Dot product of one segment [f, f + len) of a row with x, in phase layout: xph[j * (K / P) + i]
   is x[P * i + j], P the codes per chunk (4-bit: 2 per byte, 2-bit: 4, 3- and 5-bit: 8, 6-bit: 4),
   and c the chunk index of the segment start within the row. Each code contributes
   (code - off) * x, so the caller multiplies by the group's scale. */
static float seg_dot(const uint8_t *codes, int bits, int64_t f, int64_t len, const float *xph,
                     int64_t c, int64_t stride, float off) {
    float acc = 0.0f;
    if (bits == 8) {
        const uint8_t *p = codes + f;
        const float *x0 = xph + c;
        for (int64_t i = 0; i < len; i++) acc += ((float)p[i] - off) * x0[i];
    } else if (bits == 4) {
        const uint8_t *p = codes + (f >> 1);
        const float *x0 = xph + c, *x1 = xph + stride + c;
        int64_t m = len >> 1, i = 0;
        for (; i < m; i++)
            acc += ((float)(p[i] & 15) - off) * x0[i] + ((float)(p[i] >> 4) - off) * x1[i];
    } else if (bits == 2) {
        const uint8_t *p = codes + (f >> 2);
        const float *x0 = xph + c, *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
        int64_t m = len >> 2, i = 0;
        for (; i < m; i++) {
            uint8_t b = p[i];
            acc += ((float)(b & 3) - off) * x0[i] + ((float)((b >> 2) & 3) - off) * x1[i]
                 + ((float)((b >> 4) & 3) - off) * x2[i] + ((float)(b >> 6) - off) * x3[i];
        }
    } else if (bits == 3) {
        acc = chunk_dot(codes + (f >> 3) * 3, 3, 8, 3, len >> 3, xph, c, stride, off);
    } else if (bits == 5) {
        acc = chunk_dot(codes + (f >> 3) * 5, 5, 8, 5, len >> 3, xph, c, stride, off);
    } else {  /* 6 bits */
        acc = chunk_dot(codes + (f >> 2) * 3, 6, 4, 3, len >> 2, xph, c, stride, off);
    }
    return acc;
}

/* The group g holding element f0 + k of a row starting at element f0, and where its part of the row
   ends (groups are consecutive row-major elements and may straddle rows). */
static inline int64_t group_end(int64_t f0, int64_t k, int64_t K, int64_t gs, int64_t *g) {
    *g = (f0 + k) / gs;
    int64_t end = (*g + 1) * gs - f0;
    return end > K ? K : end;
}

/* Code number e of a packed stream (any width up to 8 bits, any alignment). */
static inline uint32_t code_at(const uint8_t *codes, int bits, int64_t e) {
    int64_t bit = e * bits;
    uint32_t w = codes[bit >> 3];
    if ((bit & 7) + bits > 8) w |= (uint32_t)codes[(bit >> 3) + 1] << 8;
    return (w >> (bit & 7)) & ((1u << bits) - 1);
}

/* Any alignment: each code read from the (at most two) bytes holding it; x in plain layout. */
static float seg_dot_any(const uint8_t *codes, int bits, int64_t f, int64_t len, const float *x, float off) {
    float acc = 0.0f;
    for (int64_t i = 0; i < len; i++) acc += ((float)code_at(codes, bits, f + i) - off) * x[i];
    return acc;
}

/* Lookup-table codes at any alignment: sum of tab[code] * x[i] over the segment [f, f + len). */
static float seg_dot_lut(const uint8_t *codes, int bits, int64_t f, int64_t len, const float *x, const float *tab) {
    float acc = 0.0f;
    int64_t i = 0;
    if (bits == 4 && !(f & 1)) {  /* two codes a byte, the first in the low nibble */
        const uint8_t *p = codes + (f >> 1);
        for (; i + 2 <= len; i += 2) {
            uint8_t b = p[i >> 1];
            acc += tab[b & 15] * x[i] + tab[b >> 4] * x[i + 1];
        }
    }
    for (; i < len; i++) acc += tab[code_at(codes, bits, f + i)] * x[i];
    return acc;
}

#ifdef __AVX2__
/* Whole rows at a time: 4-bit integer codes in phase layout (row_dot4), 2-4-bit table codes and
   2-, 3- and 8-bit integer codes in plain layout (row_dot_lut, row_dot_int). Each group's partial
   sums stay in vector registers and are scaled into a row total there; one horizontal sum per row instead of one per group (at groups of 32-64 that
   sum and the per-weight offset subtraction cost about as much as the products). The offset term
   s * off * sum(x) comes from a vector sum of x over the group. */
static float row_dot4(const uint8_t *codes, int64_t f0, int64_t K, int64_t gs, const uint16_t *scales,
                      const float *scales32, const uint16_t *zeros, float sym_offset, const float *xph,
                      int64_t stride) {
    const __m256i low4 = _mm256_set1_epi32(15);
    __m256 total = _mm256_setzero_ps();
    float rest = 0.0f;
    int64_t k = 0;
    while (k < K) {
        int64_t g, end = group_end(f0, k, K, gs, &g);
        float s = scales32 ? scales32[g] : HALF[scales[g]];
        float so = s * (zeros ? HALF[zeros[g]] : sym_offset);
        const uint8_t *p = codes + ((f0 + k) >> 1);
        const float *x0 = xph + (k >> 1), *x1 = xph + stride + (k >> 1);
        int64_t m = (end - k) >> 1, i = 0;
        __m256 a = _mm256_setzero_ps(), ax = _mm256_setzero_ps();
        for (; i + 8 <= m; i += 8) {  /* 8 bytes: 16 codes */
            __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
            __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i);
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), v0, a);
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), v1, a);
            ax = _mm256_add_ps(ax, _mm256_add_ps(v0, v1));
        }
        total = _mm256_fmadd_ps(a, _mm256_set1_ps(s), total);
        total = _mm256_fnmadd_ps(ax, _mm256_set1_ps(so), total);
        for (; i < m; i++)
            rest += s * ((float)(p[i] & 15) * x0[i] + (float)(p[i] >> 4) * x1[i]) - so * (x0[i] + x1[i]);
        k = end;
    }
    return hsum(total) + rest;
}

/* Up to 8 bytes from p, little-endian: the chunk of 8 codes at a code index that is a multiple of 8
   (bits bytes for 2-4-bit codes). */
static inline uint32_t chunk8(const uint8_t *p, int bits) {
    uint32_t w = 0;
    if (bits == 4) {  /* one 4-byte load (a byte loop here ran 4-bit tables 1.4x slower) */
        memcpy(&w, p, 4);
        return w;
    }
    for (int b = 0; b < bits; b++) w |= (uint32_t)p[b] << (8 * b);
    return w;
}

/* Always inlined into calls with a constant width, so each width gets its own unrolled loop. */
static inline __attribute__((always_inline)) float row_dot_lut(const uint8_t *codes, int bits, int64_t f0, int64_t K, int64_t gs,
                         const uint16_t *scales, const float *tab, const float *x) {
    const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    /* 8 levels in one register (the permute reads the low 3 bits of an index); 16 in two, bit 3 picks */
    const __m256 t0 = _mm256_loadu_ps(tab), t1 = _mm256_loadu_ps(tab + 8);
    __m256 total = _mm256_setzero_ps();
    float rest = 0.0f;
    int64_t k = 0;
    while (k < K) {
        int64_t g, end = group_end(f0, k, K, gs, &g);
        float s = HALF[scales[g]];
        int64_t i = k;
        for (; i < end && ((f0 + i) & 7); i++)  /* up to a code index that is a multiple of 8 */
            rest += s * tab[code_at(codes, bits, f0 + i)] * x[i];
        __m256 a = _mm256_setzero_ps();
        for (; i + 8 <= end; i += 8) {
            uint32_t w = chunk8(codes + ((f0 + i) >> 3) * bits, bits);
            __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), shifts), mask);
            __m256 v = _mm256_permutevar8x32_ps(t0, idx);
            if (bits == 4)
                v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(t1, idx),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
            a = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + i), a);
        }
        total = _mm256_fmadd_ps(a, _mm256_set1_ps(s), total);
        for (; i < end; i++) rest += s * tab[code_at(codes, bits, f0 + i)] * x[i];
        k = end;
    }
    return hsum(total) + rest;
}

/* 2-, 3- and 8-bit integer codes, one whole row against x in plain layout, the same vector scheme:
   2- and 3-bit codes 8 at a time from the bits bytes of a chunk (code index a multiple of 8; the
   codes before and after in a group one by one), 8-bit codes 8 bytes at a time. */
static inline __attribute__((always_inline)) float row_dot_int(const uint8_t *codes, int bits, int64_t f0,
        int64_t K, int64_t gs, const uint16_t *scales, const float *scales32, const uint16_t *zeros,
        float sym_offset, const float *x) {
    const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    __m256 total = _mm256_setzero_ps();
    float rest = 0.0f;
    int64_t k = 0;
    while (k < K) {
        int64_t g, end = group_end(f0, k, K, gs, &g);
        float s = scales32 ? scales32[g] : HALF[scales[g]];
        float off = zeros ? HALF[zeros[g]] : sym_offset, so = s * off;
        __m256 a = _mm256_setzero_ps(), ax = _mm256_setzero_ps();
        int64_t i = k;
        if (bits == 8) {
            for (; i + 8 <= end; i += 8) {
                __m256 v = _mm256_loadu_ps(x + i);
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + f0 + i)));
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), v, a);
                ax = _mm256_add_ps(ax, v);
            }
        } else {
            for (; i < end && ((f0 + i) & 7); i++) rest += s * ((float)code_at(codes, bits, f0 + i) - off) * x[i];
            for (; i + 8 <= end; i += 8) {
                uint32_t w = chunk8(codes + ((f0 + i) >> 3) * bits, bits);
                __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), shifts), mask);
                __m256 v = _mm256_loadu_ps(x + i);
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), v, a);
                ax = _mm256_add_ps(ax, v);
            }
        }
        total = _mm256_fmadd_ps(a, _mm256_set1_ps(s), total);
        total = _mm256_fnmadd_ps(ax, _mm256_set1_ps(so), total);
        for (; i < end; i++) rest += s * ((float)code_at(codes, bits, f0 + i) - off) * x[i];
        k = end;
    }
    return hsum(total) + rest;
}
#endif

/* y[T, N] = x[T, K] @ W^T for W [N, K] stored as group-wise codes, the scales fp16 (scales) or
   float32 (scales32, when not NULL). With phased != 0 (every row and group starts on a chunk
   boundary) x is first copied into phase layout (see seg_dot). With a table (lookup-table codes,
   2**bits fp16 levels; phased must be 0) a weight is scale * table[code] instead. */
int uq_matmul(const uint8_t *codes, int bits, const uint16_t *scales, const float *scales32,
              const uint16_t *zeros, float sym_offset, const uint16_t *table, int64_t N, int64_t K, int64_t gs,
              const float *x_in, int phased, int64_t T, float *y, int threads) {
    float tab[256] = {0};  /* zero-filled: the vector lookups load 16 entries whatever the width */
    if (table) for (int i = 0; i < (1 << bits); i++) tab[i] = HALF[table[i]];
    int64_t per = 8 / (bits & -bits), stride = K / per;  /* codes per chunk: lcm(bits, 8) / bits */
    const float *x = x_in;
    float *xph = NULL;
    /* 1: row_dot4 (phase layout); 2: row_dot_lut or row_dot_int (plain x) */
    int rowwise = 0;
#ifdef __AVX2__
    if (table) rowwise = bits <= 4 ? 2 : 0;
    else rowwise = bits == 4 ? (phased && per > 1 ? 1 : 0) : (bits == 2 || bits == 3 || bits == 8) ? 2 : 0;
#endif
    if (phased && per > 1 && rowwise != 2) {
        xph = (float *)malloc(sizeof(float) * T * K);
        if (!xph) return 1;
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < stride; i++)
                for (int64_t j = 0; j < per; j++) xph[t * K + j * stride + i] = x_in[t * K + per * i + j];
        x = xph;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t f0 = n * K;
#ifdef __AVX2__
        if (rowwise) {
            for (int64_t t = 0; t < T; t++)
                y[t * N + n] = rowwise == 1 ? row_dot4(codes, f0, K, gs, scales, scales32, zeros, sym_offset,
                                                       x + t * K, stride)
                             : table ? (bits == 4 ? row_dot_lut(codes, 4, f0, K, gs, scales, tab, x_in + t * K)
                                        : bits == 3 ? row_dot_lut(codes, 3, f0, K, gs, scales, tab, x_in + t * K)
                                                    : row_dot_lut(codes, 2, f0, K, gs, scales, tab, x_in + t * K))
                             : bits == 8 ? row_dot_int(codes, 8, f0, K, gs, scales, scales32, zeros, sym_offset,
                                                       x_in + t * K)
                             : bits == 3 ? row_dot_int(codes, 3, f0, K, gs, scales, scales32, zeros, sym_offset,
                                                       x_in + t * K)
                                         : row_dot_int(codes, 2, f0, K, gs, scales, scales32, zeros, sym_offset,
                                                       x_in + t * K);
            continue;
        }
#endif
        for (int64_t t = 0; t < T; t++) y[t * N + n] = 0.0f;
        int64_t k = 0;
        while (k < K) {
            int64_t g, end = group_end(f0, k, K, gs, &g);
            float s = scales32 ? scales32[g] : HALF[scales[g]];
            float off = zeros ? HALF[zeros[g]] : sym_offset;
            for (int64_t t = 0; t < T; t++) {
                float acc = table ? seg_dot_lut(codes, bits, f0 + k, end - k, x + t * K + k, tab)
                            : phased ? seg_dot(codes, bits, f0 + k, end - k, x + t * K, k / per, stride, off)
                                     : seg_dot_any(codes, bits, f0 + k, end - k, x + t * K + k, off);
                y[t * N + n] += s * acc;
            }
            k = end;
        }
    }
    free(xph);
    return 0;
}

/* Vector codes: nv whole vectors of d weights from vector v, against x (the first vector's first input):
   sum of point[code][j] * x[i * d + j]. Always inlined into calls with constant widths and d, so each
   layout gets its own loop; d accumulators, one per coordinate. */
static inline __attribute__((always_inline)) float vq_dot(const uint8_t *codes, int cbits, int d, int64_t v,
                                                          int64_t nv, const float *tab, const float *x) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int64_t i = 0; i < nv; i++) {
        const float *pt = tab + (int64_t)(cbits == 8 ? codes[v + i] : code_at(codes, cbits, v + i)) * d;
        const float *xi = x + i * d;
        a0 += pt[0] * xi[0];
        a1 += pt[1] * xi[1];
        if (d == 4) {
            a2 += pt[2] * xi[2];
            a3 += pt[3] * xi[3];
        }
    }
    return (a0 + a1) + (a2 + a3);
}

/* Elements [e, stop) of one vector (a part cut by a row's start or end), one by one. */
static float vq_part(const uint8_t *codes, int cbits, int d, int64_t e, int64_t stop, const float *tab,
                     const float *x) {
    int64_t v = e / d;
    const float *pt = tab + (int64_t)code_at(codes, cbits, v) * d + (e - v * d);  /* pt[i]: element e + i */
    float acc = 0.0f;
    for (int64_t i = 0; i < stop - e; i++) acc += pt[i] * x[i];
    return acc;
}

/* y[T, N] = x[T, K] @ W^T for W [N, K] stored as vector codes (uqcit.tensor.vq): element e is coordinate
   e % d of point code[e / d] of a codebook of fp16 points (table, [2**cbits, d] row by row), times the
   fp16 scale of its group; codes are cbits = d * bits wide. Vectors and groups are consecutive
   row-major elements and may straddle rows (a group always holds whole vectors, so only a row's
   first and last vector can be cut). Portable C: the codebook is decoded to floats once per call,
   each code is read once per vector and input row. */
int uq_matmul_vq(const uint8_t *codes, int cbits, int d, const uint16_t *scales, const uint16_t *table, int64_t N,
                 int64_t K, int64_t gs, const float *x, int64_t T, float *y, int threads) {
    int64_t npts = (int64_t)1 << cbits;
    float *tab = (float *)malloc(sizeof(float) * npts * d);
    if (!tab) return 1;
    for (int64_t i = 0; i < npts * d; i++) tab[i] = HALF[table[i]];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t f0 = n * K;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * K;  /* xt[e - f0]: the input of element e of this row */
            float total = 0.0f;
            int64_t k = 0;
            while (k < K) {
                int64_t g, end = group_end(f0, k, K, gs, &g);
                int64_t e = f0 + k, stop = f0 + end, acc_end;
                float acc = 0.0f;
                if (e % d) {  /* a vector cut by the row's start */
                    acc_end = (e / d + 1) * d;
                    if (acc_end > stop) acc_end = stop;
                    acc += vq_part(codes, cbits, d, e, acc_end, tab, xt + (e - f0));
                    e = acc_end;
                }
                int64_t nv = (stop - e) / d, v = e / d;
                if (nv) {
                    const float *xe = xt + (e - f0);
                    acc += d == 4 ? vq_dot(codes, 8, 4, v, nv, tab, xe)
                         : cbits == 8 ? vq_dot(codes, 8, 2, v, nv, tab, xe)
                         : cbits == 6 ? vq_dot(codes, 6, 2, v, nv, tab, xe)
                                      : vq_dot(codes, 4, 2, v, nv, tab, xe);
                    e += nv * d;
                }
                if (e < stop) acc += vq_part(codes, cbits, d, e, stop, tab, xt + (e - f0));  /* cut by the row's end */
                total += HALF[scales[g]] * acc;
                k = end;
            }
            y[t * N + n] = total;
        }
    }
    free(tab);
    return 0;
}

/* y[T, N] = x[T, K] @ W^T for an fp16 weight W [N, K] stored as is (pass-through, e.g. a tied LM
   head): each row converted 8 values at a time (F16C) into the dot product, never as a whole. */
int uq_matmul_f16(const uint16_t *w, int64_t N, int64_t K, const float *x, int64_t T, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * K;
            float acc = 0.0f;
            int64_t k = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
            __m256 a = _mm256_setzero_ps();
            for (; k + 8 <= K; k += 8)
                a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k))),
                                    _mm256_loadu_ps(xt + k), a);
            acc = hsum(a);
#endif
            for (; k < K; k++) acc += HALF[row[k]] * xt[k];
            y[t * N + n] = acc;
        }
    }
    return 0;
}
