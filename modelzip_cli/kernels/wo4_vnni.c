// vnni4 and vnni8: weight-only int4 and int8 layers on AVX-512 VNNI (kernels/weight_only.py builds this file
// with the C compiler and loads it with ctypes; nothing else calls it). vnni8 is at the end.
//
// y = x · Wᵀ + bias with W[n, k] = (q[n, k] − zp[n, g]) · s[n, g], k in group g, the stored layout as it is:
// q packed two per byte (low nibble = even column), s float32 and zp int8 per (row, group). x is rounded to
// int8 per group of the layer's own group size (xs = max|x| / 127 over the group), as llama.cpp's Q4 × Q8 dot
// products do, so that one vpdpbusd multiplies and adds 64 weights by 64 activations:
//   y[m, n] = Σ_g s[n, g] · xs[m, g] · (Σ_k q[n, k] · xq[m, k] − zp[n, g] · Σ_k xq[m, k]) + bias[n].
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PARALLEL_FROM (1 << 18)  // multiply-adds (M · N · K) from which the product is shared among threads

// Rows prefetched this many blocks (of 4 rows) ahead, group by group: the weights come from memory at the
// speed of the summing rather than of each line's latency. A fixed 512 bytes ahead in the row (what this was)
// fell on the block's own rows where rows are short: 1024→4096 from memory took 409 µs a call on one thread
// (int4pack 322), 263 µs with this; 1536→576 83 → 60 µs.
#define AHEAD_BLOCKS 2


// The lanes of 16 values from k that lie inside a row of Kx (columns past it, of a padded group, read as zeros).
static inline __mmask16 inside(int k, int Kx) {
    const int left = Kx - k;
    return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

// The int8 step of the group of GS columns from k0 of a row of Kx: max|x| / 127 (1 where the group is all zeros).
static inline float group_scale(const float *row, int k0, int GS, int Kx) {
    __m512 amax = _mm512_setzero_ps();
    for (int k = k0; k < k0 + GS; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(inside(k, Kx), row + k)));
    const float top = _mm512_reduce_max_ps(amax);
    return top > 0.f ? top / 127.f : 1.f;
}

// x (M, Kx) float32, read as (M, K) with zeros past column Kx (a layer whose width is not a whole number of
// groups: the stored weight is padded, the input is not) → xe, xo (M, K/2) int8 (even and odd columns, as the
// nibbles are), xs (M, G) float32 scales, d (M, G) float32: each scale times the sum of its group's int8 values.
// 16 columns at a time; v · (1 / scale) rounded to nearest even, as lrintf in the default rounding mode.
static void round_activations(const float *x, int M, int K, int Kx, int GS, int8_t *xe, int8_t *xo, float *xs,
                              float *d) {
    const int groups = K / GS;
    // 32 consecutive floats → their 16 even and 16 odd columns
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int m = 0; m < M; m++) {
        const float *row = x + (int64_t)m * Kx;
        for (int g = 0; g < groups; g++) {
            const int k0 = g * GS;
            const float scale = group_scale(row, k0, GS, Kx);
            const __m512 inv = _mm512_set1_ps(1.f / scale);
            __m512i sum = _mm512_setzero_si512();
            int8_t *e = xe + (int64_t)m * (K / 2) + k0 / 2, *o = xo + (int64_t)m * (K / 2) + k0 / 2;
            for (int k = k0; k < k0 + GS; k += 32) {
                const __m512 a = _mm512_maskz_loadu_ps(inside(k, Kx), row + k);
                const __m512 b = _mm512_maskz_loadu_ps(inside(k + 16, Kx), row + k + 16);
                const __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, even, b), inv));
                const __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, odd, b), inv));
                _mm_storeu_si128((__m128i *)(e + (k - k0) / 2), _mm512_cvtsepi32_epi8(qe));
                _mm_storeu_si128((__m128i *)(o + (k - k0) / 2), _mm512_cvtsepi32_epi8(qo));
                sum = _mm512_add_epi32(sum, _mm512_add_epi32(qe, qo));
            }
            xs[(int64_t)m * groups + g] = scale;
            d[(int64_t)m * groups + g] = scale * (float)_mm512_reduce_add_epi32(sum);
        }
    }
}

// R output rows from row n0 for activation row m: R weight streams in flight and 2·R independent vpdpbusd
// chains (one chain waits on its own latency, about 5 cycles an instruction), each activation load shared by them.
static inline __attribute__((always_inline)) void rows_dot(
        const uint8_t *qw, const float *scales, const float *zs, const int8_t *e, const int8_t *o, const float *xs,
        const float *d, const float *bias, float *y, int n0, int N, int half, int groups, int gb, __mmask64 part,
        int step, const int R) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i lo[4], hi[4];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_si512();
        for (int r = 0; r < R; r++) {  // this group of the rows AHEAD_BLOCKS blocks on: memory latency hidden
            const int64_t ahead = (int64_t)n0 + AHEAD_BLOCKS * 4 + r;
            if (ahead < N)
                _mm_prefetch((const char *)(qw + ahead * half + g * gb), _MM_HINT_T1);
        }
        for (int j = g * gb; j < (g + 1) * gb; j += step) {
            const __m512i xe_j = _mm512_maskz_loadu_epi8(part, e + j), xo_j = _mm512_maskz_loadu_epi8(part, o + j);
            for (int r = 0; r < R; r++) {
                const __m512i w = _mm512_maskz_loadu_epi8(part, qw + (int64_t)(n0 + r) * half + j);
                lo[r] = _mm512_dpbusd_epi32(lo[r], _mm512_and_si512(w, low), xe_j);
                hi[r] = _mm512_dpbusd_epi32(hi[r], _mm512_and_si512(_mm512_srli_epi16(w, 4), low), xo_j);
            }
        }
        for (int r = 0; r < R; r++) {
            const float s = scales[(int64_t)(n0 + r) * groups + g] * xs[g];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo[r], hi[r])), _mm512_set1_ps(s), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {  // the zero points' part, Σ_g zs[n, g] · d[g], 16 groups at a time
        __m512 z = _mm512_setzero_ps();
        const float *zs_n = zs + (int64_t)(n0 + r) * groups;
        for (int g = 0; g < groups; g += 16) {
            const __mmask16 k = inside(g, groups);
            z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, zs_n + g), _mm512_maskz_loadu_ps(k, d + g), z);
        }
        y[n0 + r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[r], z)) + (bias ? bias[n0 + r] : 0.f);
    }
}

// zs: (N, G) float32 scale · zero point of each group (the layer's constant, made once at packing).
// x: (M, Kx) float32, Kx ≤ K; GS: 32, 64 or a multiple of 128; K a multiple of GS (and of 32).
// Returns 0, or -1 where the activations' scratch (M·K + 8·M·(K/GS) bytes) could not be allocated.
int wo4_vnni(const uint8_t *qw, const float *scales, const float *zs, const float *x, const float *bias,
             float *y, int M, int N, int K, int Kx, int GS, int threads) {
    const int half = K / 2, groups = K / GS, gb = GS / 2;  // packed bytes per row, per group
    uint8_t *scratch = malloc((size_t)M * K + 8 * (size_t)M * groups);
    if (!scratch) return -1;
    int8_t *xe = (int8_t *)scratch, *xo = xe + (int64_t)M * half;
    float *xs = (float *)(xo + (int64_t)M * half);
    float *d = xs + (int64_t)M * groups;  // xs · (sum of the group's int8 activations): what zs multiplies
    round_activations(x, M, K, Kx, GS, xe, xo, xs, d);
    const __mmask64 part = gb >= 64 ? ~0ull : gb == 32 ? 0xFFFFFFFFull : 0xFFFFull;  // groups of 64, 32: one load
    const int step = gb >= 64 ? 64 : gb;
    const int blocks = (N + 3) / 4;
    // a small layer runs on the calling thread: waking the others costs more than its whole product
    #pragma omp parallel for num_threads(threads) schedule(static) if ((int64_t)M * N * K >= PARALLEL_FROM)
    for (int blk = 0; blk < blocks; blk++) {
        const int n0 = blk * 4;
        for (int m = 0; m < M; m++) {
            const int8_t *e = xe + (int64_t)m * half, *o = xo + (int64_t)m * half;
            const float *xs_m = xs + (int64_t)m * groups, *d_m = d + (int64_t)m * groups;
            float *y_m = y + (int64_t)m * N;
            if (N - n0 >= 4) {
                rows_dot(qw, scales, zs, e, o, xs_m, d_m, bias, y_m, n0, N, half, groups, gb, part, step, 4);
            } else {
                for (int n = n0; n < N; n++)
                    rows_dot(qw, scales, zs, e, o, xs_m, d_m, bias, y_m, n, N, half, groups, gb, part, step, 1);
            }
        }
    }
    free(scratch);
    return 0;
}


// ---------------------------------------------------------------------------------------------------------------
// vnni8: W[n, k] = (q[n, k] − zp[n, g]) · s[n, g] with q int8 (N, K) as stored. vpdpbusd multiplies unsigned by
// signed bytes, so the activations go in as xq + 128 (1..255) and the 128 · Σ_k q[n, k] that adds is taken off:
//   y[m, n] = Σ_g s[n, g] · xs[m, g] · (Σ_k q · (xq + 128) − 128 · Σ_k q[n, k] − zp[n, g] · Σ_k xq) + bias[n]
// with c[n, g] = s[n, g] · 128 · Σ_k q[n, k] and zs[n, g] = s[n, g] · zp[n, g], made once at packing. The offset's
// term is taken off in float, after the groups are summed: where it is most of the sum (a row of weights of one
// sign) the result carries float rounding of the offset sum, about 1e-7 of 128 · Σ|q| · s · xs (relative 4e-5
// of the output on a 4096-wide row of positive weights), far below the int8 rounding of the activations.

// x (M, Kx) → xu (M, K) uint8 = xq + 128 (zeros past Kx: xq 0), xs and d as round_activations'. v / scale (a
// division, not a product with 1 / scale: a per-token int8 layer's `_int_mm` path rounds torch's x / s, and the
// two must pick the same integers, also at a half step) rounded to nearest even.
static void round_activations_u8(const float *x, int M, int K, int Kx, int GS, uint8_t *xu, float *xs, float *d) {
    const int groups = K / GS;
    const __m512i offset = _mm512_set1_epi32(128);
    for (int m = 0; m < M; m++) {
        const float *row = x + (int64_t)m * Kx;
        for (int g = 0; g < groups; g++) {
            const int k0 = g * GS;
            const float scale = group_scale(row, k0, GS, Kx);
            const __m512 step = _mm512_set1_ps(scale);
            __m512i sum = _mm512_setzero_si512();
            for (int k = k0; k < k0 + GS; k += 16) {
                const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(inside(k, Kx), row + k), step));
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i *)(xu + (int64_t)m * K + k), _mm512_cvtusepi32_epi8(_mm512_add_epi32(q, offset)));
            }
            xs[(int64_t)m * groups + g] = scale;
            d[(int64_t)m * groups + g] = scale * (float)_mm512_reduce_add_epi32(sum);
        }
    }
}

// R output rows from n0 for one activation row: two vpdpbusd chains a row (64-byte chunks alternate).
static inline __attribute__((always_inline)) void rows_dot8(
        const int8_t *qw, const float *scales, const float *cs, const float *zs, const uint8_t *xu, const float *xs,
        const float *d, const float *bias, float *y, int n0, int N, int K, int groups, int GS, const int R) {
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __mmask64 tail = GS % 64 ? (__mmask64)((1ull << (GS % 64)) - 1) : ~0ull;
    for (int g = 0; g < groups; g++) {
        const int k0 = g * GS;
        for (int r = 0; r < R; r++) {  // this group of the rows AHEAD_BLOCKS blocks on
            const int64_t ahead = (int64_t)n0 + AHEAD_BLOCKS * 4 + r;
            if (ahead < N)
                for (int k = 0; k < GS; k += 64)
                    _mm_prefetch((const char *)(qw + ahead * K + k0 + k), _MM_HINT_T1);
        }
        __m512i a[4], b[4];
        for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_si512();
        int k = 0;
        for (; k + 128 <= GS; k += 128) {
            const __m512i x0 = _mm512_loadu_si512(xu + k0 + k), x1 = _mm512_loadu_si512(xu + k0 + k + 64);
            for (int r = 0; r < R; r++) {
                const int8_t *w = qw + (int64_t)(n0 + r) * K + k0 + k;
                a[r] = _mm512_dpbusd_epi32(a[r], x0, _mm512_loadu_si512(w));
                b[r] = _mm512_dpbusd_epi32(b[r], x1, _mm512_loadu_si512(w + 64));
            }
        }
        for (; k < GS; k += 64) {  // a last 64 bytes, or fewer
            const __mmask64 in = k + 64 <= GS ? ~0ull : tail;
            const __m512i x0 = _mm512_maskz_loadu_epi8(in, xu + k0 + k);
            for (int r = 0; r < R; r++)
                a[r] = _mm512_dpbusd_epi32(a[r], x0, _mm512_maskz_loadu_epi8(in, qw + (int64_t)(n0 + r) * K + k0 + k));
        }
        for (int r = 0; r < R; r++) {
            const float s = scales[(int64_t)(n0 + r) * groups + g] * xs[g];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[r], b[r])), _mm512_set1_ps(s), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {  // Σ_g c[n, g] · xs[g] + zs[n, g] · d[g], 16 groups at a time
        __m512 z = _mm512_setzero_ps();
        const float *cs_n = cs + (int64_t)(n0 + r) * groups, *zs_n = zs + (int64_t)(n0 + r) * groups;
        for (int g = 0; g < groups; g += 16) {
            const __mmask16 k = inside(g, groups);
            z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, cs_n + g), _mm512_maskz_loadu_ps(k, xs + g), z);
            z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, zs_n + g), _mm512_maskz_loadu_ps(k, d + g), z);
        }
        y[n0 + r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[r], z)) + (bias ? bias[n0 + r] : 0.f);
    }
}

// qw (N, K) int8; scales, cs, zs (N, K/GS) float32; x (M, Kx) float32, Kx ≤ K; GS a multiple of 16, K of GS.
// Returns 0, or -1 where the activations' scratch (M·K + 8·M·(K/GS) bytes) could not be allocated.
int wo8_vnni(const int8_t *qw, const float *scales, const float *cs, const float *zs, const float *x,
             const float *bias, float *y, int M, int N, int K, int Kx, int GS, int threads) {
    const int groups = K / GS;
    uint8_t *xu = malloc((size_t)M * K + 8 * (size_t)M * groups);
    if (!xu) return -1;
    float *xs = (float *)(xu + (int64_t)M * K);
    float *d = xs + (int64_t)M * groups;
    round_activations_u8(x, M, K, Kx, GS, xu, xs, d);
    const int blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static) if ((int64_t)M * N * K >= PARALLEL_FROM)
    for (int blk = 0; blk < blocks; blk++) {
        const int n0 = blk * 4;
        for (int m = 0; m < M; m++) {
            const uint8_t *xu_m = xu + (int64_t)m * K;
            const float *xs_m = xs + (int64_t)m * groups, *d_m = d + (int64_t)m * groups;
            float *y_m = y + (int64_t)m * N;
            if (N - n0 >= 4) {
                rows_dot8(qw, scales, cs, zs, xu_m, xs_m, d_m, bias, y_m, n0, N, K, groups, GS, 4);
            } else {
                for (int n = n0; n < N; n++)
                    rows_dot8(qw, scales, cs, zs, xu_m, xs_m, d_m, bias, y_m, n, N, K, groups, GS, 1);
            }
        }
    }
    free(xu);
    return 0;
}
