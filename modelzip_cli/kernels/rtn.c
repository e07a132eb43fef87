// Round-to-nearest weight-only quantization in one pass over the weight (nn/weight_only.py calls it through
// kernels/native.py, with ctypes; nothing else does). Each function gives exactly the integers, scales and zero
// points of `weight_only.rtn` (the torch reference: the same float32 operations in the same order, IEEE
// division, rounding half to even), so a layer quantized here or by torch has the same bits. Built without
// -ffast-math and with -ffp-contract=off: no reassociated or fused arithmetic.
//
// w is (rows, cols) float32 (dtype 0) or bfloat16 (dtype 1, widened exactly); every group of `group` columns
// in a row gets a scale and a zero point. A group with a value that is not finite stops the pass: the caller
// falls back to torch, which decides what such a weight gives.
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float load(const void *w, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)w)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// int4, asymmetric over [min, max] ∪ {0}: s = max((hi − lo) / 15, 1e-12), z = clamp(round(−lo / s), 0, 15),
// q = clamp(round(w / s) + z, 0, 15), packed two per byte, the even column in the low nibble.
// q is (rows, cols / 2) uint8, scales (rows, cols / group) float32, zero points int8. Returns 0, or −1 if a value
// is not finite. cols and group even, group divides cols.
int rtn4(const void *w, int dtype, int64_t rows, int64_t cols, int64_t group, uint8_t *q, float *scales,
         int8_t *zero_points, int threads) {
    const int64_t groups = cols / group;
    int bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(|:bad)
    for (int64_t r = 0; r < rows; r++) {
        float v[group];  // the group widened once: the pass reads the weight's memory once
        for (int64_t g = 0; g < groups && !bad; g++) {
            const int64_t base = r * cols + g * group;
            float lo = 0.f, hi = 0.f;  // the clamps: lo ≤ 0 ≤ hi
            int finite = 1;
            for (int64_t k = 0; k < group; k++) {
                float x = load(w, dtype, base + k);
                v[k] = x;
                finite &= isfinite(x) != 0;
                lo = x < lo ? x : lo;
                hi = x > hi ? x : hi;
            }
            if (!finite) {
                bad = 1;
                break;
            }
            float s = (hi - lo) / 15.f;
            s = s < 1e-12f ? 1e-12f : s;
            float z = nearbyintf(-lo / s);
            z = z < 0.f ? 0.f : (z > 15.f ? 15.f : z);
            scales[r * groups + g] = s;
            zero_points[r * groups + g] = (int8_t)z;
            uint8_t *out = q + (r * cols + g * group) / 2;
            for (int64_t k = 0; k < group; k += 2) {
                float a = nearbyintf(v[k] / s) + z, b = nearbyintf(v[k + 1] / s) + z;
                a = a < 0.f ? 0.f : (a > 15.f ? 15.f : a);
                b = b < 0.f ? 0.f : (b > 15.f ? 15.f : b);
                out[k / 2] = (uint8_t)((uint8_t)a | ((uint8_t)b << 4));
            }
        }
    }
    return bad ? -1 : 0;
}

// int8, symmetric: s = max(max |w|, 1e-12) / 127, q = clamp(round(w / s), −127, 127); q (rows, cols) int8,
// scales (rows, cols / group) float32 (zero points are 0). Returns 0, or −1 if a value is not finite.
int rtn8(const void *w, int dtype, int64_t rows, int64_t cols, int64_t group, int8_t *q, float *scales,
         int threads) {
    const int64_t groups = cols / group;
    int bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(|:bad)
    for (int64_t r = 0; r < rows; r++) {
        float v[group];
        for (int64_t g = 0; g < groups && !bad; g++) {
            const int64_t base = r * cols + g * group;
            float amax = 0.f;
            int finite = 1;
            for (int64_t k = 0; k < group; k++) {
                float x = load(w, dtype, base + k);
                v[k] = x;
                finite &= isfinite(x) != 0;
                float a = fabsf(x);
                amax = a > amax ? a : amax;
            }
            if (!finite) {
                bad = 1;
                break;
            }
            float s = (amax < 1e-12f ? 1e-12f : amax) / 127.f;
            scales[r * groups + g] = s;
            for (int64_t k = 0; k < group; k++) {
                float a = nearbyintf(v[k] / s);
                q[base + k] = (int8_t)(a < -127.f ? -127.f : (a > 127.f ? 127.f : a));
            }
        }
    }
    return bad ? -1 : 0;
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
