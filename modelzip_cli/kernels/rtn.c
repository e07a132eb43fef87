// Passes over a whole weight in C, called through kernels/native.py with ctypes: round-to-nearest weight-only
// quantization (nn/weight_only.py), and counts of non-zero and non-finite values (the checkpoint format, layer
// tables, finiteness checks, streamed runs). rtn4 and rtn8 give exactly the integers, scales and zero
// points of `weight_only.rtn` (the torch reference: the same float32 operations in the same order, IEEE
// division, rounding half to even), so a layer quantized here or by torch has the same bits. Built without
// -ffast-math and with -ffp-contract=off: no reassociated or fused arithmetic.
//
// w is (rows, cols) float32 (dtype 0) or bfloat16 (dtype 1, widened exactly); every group of `group` columns
// in a row gets a scale and a zero point. A group with a value that is not finite stops the pass: the caller
// falls back to torch, which decides what such a weight gives.
#include <stdint.h>
#include <string.h>

// Every loop below is written so that the compiler's vector code runs it without changing a result (no
// -ffast-math): minimum and maximum as integers on the floats' bits mapped to an order-preserving integer,
// finiteness as an integer test of the exponent bits, and rounding half to even as (x + 1.5·2²³) − 1.5·2²³,
// exact for |x| < 2²² in the default rounding mode (|w / s| ≤ 127 here), which rintf is where the CPU has no
// vector rounding instruction (x86-64's baseline has none).
#define MAGIC 12582912.f  // 1.5 · 2^23

// A row's work compiled for AVX-512, AVX2 and the baseline, the CPU's best chosen when the library loads (glibc's
// ifunc): the same arithmetic in wider vectors, the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline int32_t ordered(uint32_t bits) {  // a float's bits → an integer in the float's order (not NaN)
    int32_t i = (int32_t)bits;
    return i ^ ((i >> 31) & 0x7FFFFFFF);
}

static inline float from_ordered(int32_t i) {
    uint32_t bits = (uint32_t)(i ^ ((i >> 31) & 0x7FFFFFFF));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// One group's values as float32 (f) and their bits (u); returns whether every value is finite.
static inline int widen(const void *w, int dtype, int64_t base, int64_t n, uint32_t *u, float *f) {
    if (dtype == 0) {
        memcpy(u, (const float *)w + base, 4 * n);
    } else {
        const uint16_t *h = (const uint16_t *)w + base;
        for (int64_t k = 0; k < n; k++) u[k] = (uint32_t)h[k] << 16;
    }
    memcpy(f, u, 4 * n);
    uint32_t special = 0;
    for (int64_t k = 0; k < n; k++) special |= (u[k] & 0x7F800000u) == 0x7F800000u;
    return !special;
}

static inline float round_even(float x) { return (x + MAGIC) - MAGIC; }

// int4, asymmetric over [min, max] ∪ {0}: s = max((hi − lo) / 15, 1e-12), z = clamp(round(−lo / s), 0, 15),
// q = clamp(round(w / s) + z, 0, 15), packed two per byte, the even column in the low nibble.
// q is (rows, cols / 2) uint8, scales (rows, cols / group) float32, zero points int8. Returns the number of
// non-zero weights (integer ≠ zero point), or −1 if a value is not finite. cols and group even, group divides
// cols.
static CLONES int64_t rtn4_row(const void *w, int dtype, int64_t r, int64_t cols, int64_t group, uint8_t *q,
                               float *scales, int8_t *zero_points, int *bad) {
    const int64_t groups = cols / group;
    uint32_t u[group];  // the group widened once: the pass reads the weight's memory once
    float f[group];
    uint8_t t[group];
    int64_t nonzero = 0;
    for (int64_t g = 0; g < groups; g++) {
        if (!widen(w, dtype, r * cols + g * group, group, u, f)) {
            *bad = 1;
            return 0;
        }
        int32_t lo_i = 0, hi_i = 0;  // +0: the clamps lo ≤ 0 ≤ hi
        for (int64_t k = 0; k < group; k++) {
            int32_t o = ordered(u[k]);
            lo_i = o < lo_i ? o : lo_i;
            hi_i = o > hi_i ? o : hi_i;
        }
        const float lo = from_ordered(lo_i), hi = from_ordered(hi_i);
        float s = (hi - lo) / 15.f;
        s = s < 1e-12f ? 1e-12f : s;
        float z = round_even(-lo / s);
        z = z < 0.f ? 0.f : (z > 15.f ? 15.f : z);
        scales[r * groups + g] = s;
        zero_points[r * groups + g] = (int8_t)z;
        for (int64_t k = 0; k < group; k++) {
            float a = round_even(f[k] / s) + z;
            a = a < 0.f ? 0.f : a;
            a = a > 15.f ? 15.f : a;
            t[k] = (uint8_t)(int32_t)a;
        }
        const uint8_t zi = (uint8_t)z;
        uint32_t same = 0;  // weights that are zero: their integer is the zero point
        for (int64_t k = 0; k < group; k++) same += t[k] == zi;
        nonzero += group - same;
        uint8_t *out = q + (r * cols + g * group) / 2;
        for (int64_t k = 0; k < group / 2; k++) out[k] = (uint8_t)(t[2 * k] | (t[2 * k + 1] << 4));
    }
    return nonzero;
}

int64_t rtn4(const void *w, int dtype, int64_t rows, int64_t cols, int64_t group, uint8_t *q, float *scales,
             int8_t *zero_points, int threads) {
    int bad = 0;
    int64_t nonzero = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(|:bad) reduction(+:nonzero)
    for (int64_t r = 0; r < rows; r++)
        if (!bad) nonzero += rtn4_row(w, dtype, r, cols, group, q, scales, zero_points, &bad);
    return bad ? -1 : nonzero;
}

// int8, symmetric: s = max(max |w|, 1e-12) / 127, q = clamp(round(w / s), −127, 127); q (rows, cols) int8,
// scales (rows, cols / group) float32 (zero points are 0). Returns the number of non-zero integers, or −1 if a
// value is not finite.
static CLONES int64_t rtn8_row(const void *w, int dtype, int64_t r, int64_t cols, int64_t group, int8_t *q,
                               float *scales, int *bad) {
    const int64_t groups = cols / group;
    uint32_t u[group];
    float f[group];
    int64_t nonzero = 0;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t base = r * cols + g * group;
        if (!widen(w, dtype, base, group, u, f)) {
            *bad = 1;
            return 0;
        }
        uint32_t top = 0;  // |w|'s bits: an unsigned integer in |w|'s order
        for (int64_t k = 0; k < group; k++) {
            uint32_t a = u[k] & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
        float amax;
        memcpy(&amax, &top, 4);
        const float s = (amax < 1e-12f ? 1e-12f : amax) / 127.f;
        scales[r * groups + g] = s;
        for (int64_t k = 0; k < group; k++) {
            float a = round_even(f[k] / s);
            a = a < -127.f ? -127.f : a;
            a = a > 127.f ? 127.f : a;
            q[base + k] = (int8_t)(int32_t)a;
        }
        uint32_t zeros = 0;
        for (int64_t k = 0; k < group; k++) zeros += q[base + k] == 0;
        nonzero += group - zeros;
    }
    return nonzero;
}

int64_t rtn8(const void *w, int dtype, int64_t rows, int64_t cols, int64_t group, int8_t *q, float *scales,
             int threads) {
    int bad = 0;
    int64_t nonzero = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(|:bad) reduction(+:nonzero)
    for (int64_t r = 0; r < rows; r++)
        if (!bad) nonzero += rtn8_row(w, dtype, r, cols, group, q, scales, &bad);
    return bad ? -1 : nonzero;
}

// How many of a (rows, groups · gbytes) int4 weight's values differ from their group's zero point (int8,
// (rows, groups)): its non-zero weights, counted from the integers.
int64_t count4(const uint8_t *q, const int8_t *zero_points, int64_t rows, int64_t groups, int64_t gbytes,
               int threads) {
    int64_t count = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:count)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *b = q + (r * groups + g) * gbytes;
            const uint8_t z = (uint8_t)zero_points[r * groups + g];
            int64_t same = 0;
            for (int64_t k = 0; k < gbytes; k++)
                same += ((b[k] & 0x0F) == z) + ((b[k] >> 4) == z);
            count += 2 * gbytes - same;
        }
    }
    return count;
}

// Counts over n values of 2, 4 or 8 bytes (1 for nonzero), block by block in parallel: in each block of BLOCK
// values, how many are not zero (the sign bit masked off for floats: −0 is zero) and how many are not finite
// (every exponent bit set), counted into counters as narrow as the values' lanes allow, so that the compiler's
// vector code compares and adds in those lanes. Each block's loop is compiled for AVX-512, AVX2 and the
// baseline (CLONES).
#define BLOCK 32768

#define BLOCK_COUNTS(T, C)                                                                                 \
    static CLONES void counts_##T(const T *v, int64_t n, T mask, T exponent, uint32_t *zeros,             \
                                  uint32_t *special) {                                                     \
        C z = 0, e = 0;                                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                                  \
            z += (v[i] & mask) == 0;                                                                       \
            e += (v[i] & exponent) == exponent;                                                            \
        }                                                                                                  \
        *zeros = z;                                                                                        \
        *special = e;                                                                                      \
    }
BLOCK_COUNTS(uint8_t, uint16_t)  // counters of 16 bits hold a block's count (BLOCK < 2^16)
BLOCK_COUNTS(uint16_t, uint16_t)
BLOCK_COUNTS(uint32_t, uint32_t)
BLOCK_COUNTS(uint64_t, uint64_t)

#define COUNT_ALL(T)                                                                                       \
    {                                                                                                      \
        const T *v = p;                                                                                    \
        _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(+:zeros, specials)")     \
        for (int64_t b = 0; b < blocks; b++) {                                                             \
            const int64_t start = b * BLOCK, len = start + BLOCK < n ? BLOCK : n - start;                  \
            uint32_t z, e;                                                                                 \
            counts_##T(v + start, len, (T)mask, (T)exponent, &z, &e);                                      \
            zeros += z;                                                                                    \
            specials += e;                                                                                 \
        }                                                                                                  \
    }

// The non-zero count of n values of `size` bytes (mask: the bits that make a value non-zero), and in
// *nonfinite_out how many have every bit of `exponent` set (a plain count passes 0, which every value matches,
// and ignores it).
static int64_t count_all(const void *p, int64_t n, int size, uint64_t mask, uint64_t exponent,
                         int64_t *nonfinite_out, int threads) {
    int64_t zeros = 0, specials = 0;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (size == 1)
        COUNT_ALL(uint8_t)
    else if (size == 2)
        COUNT_ALL(uint16_t)
    else if (size == 4)
        COUNT_ALL(uint32_t)
    else
        COUNT_ALL(uint64_t)
    *nonfinite_out = specials;
    return n - zeros;
}

static uint64_t sign_off(int size, int is_float) {  // the bits that make a value non-zero
    const uint64_t all = size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
    return is_float ? all >> 1 : all;
}

// How many of n values of `size` bytes (1, 2, 4 or 8) are not zero: torch.count_nonzero's answer, where a float
// (is_float) is zero at +0 and −0 and an integer at 0.
int64_t nonzero(const void *p, int64_t n, int size, int is_float, int threads) {
    int64_t ignored;
    return count_all(p, n, size, sign_off(size, is_float), 0, &ignored, threads);
}

// A float tensor's non-zero count, and in *nonfinite_out how many of its values are not finite (NaN or ±inf:
// every exponent bit set), in one pass: `size` bytes a value (2, 4 or 8), `exponent` the mask of the format's
// exponent bits (float16 0x7C00, bfloat16 0x7F80, float32 0x7F800000, ...).
int64_t scan(const void *p, int64_t n, int size, uint64_t exponent, int64_t *nonfinite_out, int threads) {
    return count_all(p, n, size, sign_off(size, 1), exponent, nonfinite_out, threads);
}
