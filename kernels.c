/* dit4bit's fused kernels for the integer path, compiled on first use by integer.py (cc -O3 -march=native
   -fopenmp -ffp-contract=off) and called through torch custom ops. Plain C99 with GCC/Clang vector extensions. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One pass per token row r (sample r / T):
     v = ((x - mean) / scale) * signs, then per block of b = K0*m channels v = (H_K0 (x) H_m) v / sqrt(b),
     step = max|v| * ratio / qmax (or the sample's fixed step), q = clamp(rint(v / step)).
   rint rounds half to even, like torch.round. Built with -ffp-contract=off: no fused multiply-add, so
   every sum and product is an IEEE float32 operation (the order differs from torch's matmuls). */
typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* 16 floats; unaligned loads are fine */
#if defined(__clang__)
#define SHUF(t, ...) __builtin_shufflevector(t, t, __VA_ARGS__)
#else
#define SHUF(t, ...) __builtin_shuffle(t, (i16){__VA_ARGS__})
#endif
typedef int32_t i16 __attribute__((vector_size(64)));

/* The two rotations multiply only by +-1, an exact product, so a fused multiply-add rounds exactly like
   the separate multiply and add: contraction is safe here (and ~15% faster), and only here. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
/* out = (H_K0 (x) H_m) g * norm for one block of K0*m channels, m >= 16 a power of two */
static void rotate16(float* g, float* out, const float* HK, int64_t K0, int64_t m, float norm) {
    const v16 s1 = {1,-1,1,-1,1,-1,1,-1,1,-1,1,-1,1,-1,1,-1}, s2 = {1,1,-1,-1,1,1,-1,-1,1,1,-1,-1,1,1,-1,-1},
              s4 = {1,1,1,1,-1,-1,-1,-1,1,1,1,1,-1,-1,-1,-1}, s8 = {1,1,1,1,1,1,1,1,-1,-1,-1,-1,-1,-1,-1,-1};
    for (int64_t c = 0; c < K0 * m; c += 16) {      /* H_16 on each chunk: 4 in-register butterflies */
        v16 t = *(v16*)(g + c);
        t = SHUF(t, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14) + t * s1;  /* partner j ^ 1 */
        t = SHUF(t, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13) + t * s2;  /* j ^ 2 */
        t = SHUF(t, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11) + t * s4;  /* j ^ 4 */
        t = SHUF(t, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7) + t * s8;  /* j ^ 8 */
        *(v16*)(g + c) = t;
    }
    for (int64_t h = 16; h < m; h <<= 1)             /* H_{m/16}: butterflies at distance 16, 32, ... */
        for (int64_t i = 0; i < K0 * m; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 16) {
                v16 a = *(v16*)(g + j), c = *(v16*)(g + j + h);
                *(v16*)(g + j) = a + c;
                *(v16*)(g + j + h) = a - c;
            }
    for (int64_t i = 0; i < K0; i++)                 /* H_K0 across the K0 groups of m */
        for (int64_t j = 0; j < m; j += 16) {
            v16 o = {0};
            for (int64_t l = 0; l < K0; l++) {
                v16 in = *(v16*)(g + l * m + j);
                o += HK[i * K0 + l] * in;
            }
            *(v16*)(out + i * m + j) = o * norm;
        }
}

/* the same for any m (scalar): blocks smaller than 16 */
static void rotate_any(float* g, float* out, const float* HK, int64_t K0, int64_t m, float norm) {
    for (int64_t h = 1; h < m; h <<= 1)
        for (int64_t i = 0; i < K0 * m; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float a = g[j], c = g[j + h];
                g[j] = a + c;
                g[j + h] = a - c;
            }
    for (int64_t i = 0; i < K0; i++)
        for (int64_t j = 0; j < m; j++) {
            float o = 0.0f;
            for (int64_t l = 0; l < K0; l++) o = HK[i * K0 + l] > 0 ? o + g[l * m + j] : o - g[l * m + j];
            out[i * m + j] = o * norm;
        }
}

/* A += X V for n rows of X (row stride ldx): the low-rank branch's down-projection (V given transposed,
   K x r; A is n x r). Rows go eight at a time against each 16-wide slice of V, so a slice loaded once
   serves eight rows from registers: a row at a time streams all of V per row and runs at L2 speed.
   Fused multiply-adds are fine here: this float branch matches nothing bit for bit. */
static void lowrank_down(const float* x, int64_t ldx, int64_t n, const float* vt, int64_t K, int64_t r, float* a) {
    int64_t i = 0;
    if (r % 16 == 0)
        for (; i + 8 <= n; i += 8)
            for (int64_t j = 0; j < r; j += 16) {
                v16 acc[8] = {{0}};
                for (int64_t k = 0; k < K; k++) {
                    const v16 v = *(const v16*)(vt + k * r + j);
                    for (int64_t t = 0; t < 8; t++) acc[t] += x[(i + t) * ldx + k] * v;
                }
                for (int64_t t = 0; t < 8; t++) *(v16*)(a + (i + t) * r + j) = acc[t];
            }
    for (; i < n; i++) {                                  /* the rest, a row at a time */
        float* ar = a + i * r;
        for (int64_t j = 0; j < r; j++) ar[j] = 0.0f;
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < r; j++) ar[j] += x[i * ldx + k] * vt[k * r + j];
    }
}

/* Y += A U for n rows (U given transposed, r x N; Y is n x N): the up-projection, eight rows per slice */
static void lowrank_up(const float* a, int64_t n, const float* ut, int64_t r, int64_t N, float* y) {
    int64_t i = 0;
    if (N % 16 == 0)
        for (; i + 8 <= n; i += 8)
            for (int64_t c = 0; c < N; c += 16) {
                v16 acc[8];
                for (int64_t t = 0; t < 8; t++) acc[t] = *(v16*)(y + (i + t) * N + c);
                for (int64_t j = 0; j < r; j++) {
                    const v16 u = *(const v16*)(ut + j * N + c);
                    for (int64_t t = 0; t < 8; t++) acc[t] += a[(i + t) * r + j] * u;
                }
                for (int64_t t = 0; t < 8; t++) *(v16*)(y + (i + t) * N + c) = acc[t];
            }
    for (; i < n; i++)
        for (int64_t j = 0; j < r; j++)
            for (int64_t c = 0; c < N; c++) y[i * N + c] += a[i * r + j] * ut[j * N + c];
}

#pragma GCC pop_options

/* v = ((x - mu) / scale) * signs (each optional), then the rotation: one transformed row into w */
static void transform_row(const float* xr, const float* mu, const float* scale, const float* signs,
                          const float* HK, int64_t K0, int64_t m, int64_t K, float* w) {
    const int64_t b = K0 > 0 ? K0 * m : K;
    const float norm = K0 > 0 ? (float)(1.0 / sqrt((double)b)) : 1.0f;
    float v[K + 16];
    for (int64_t k = 0; k < K; k++) {
        float t = mu ? xr[k] - mu[k] : xr[k];
        if (scale) t = t / scale[k];
        v[k] = signs ? t * signs[k] : t;
    }
    if (K0 == 0) {
        memcpy(w, v, K * sizeof(float));
        return;
    }
    for (int64_t o = 0; o < K; o += b) {
        if (m >= 16) rotate16(v + o, w + o, HK, K0, m, norm);
        else rotate_any(v + o, w + o, HK, K0, m, norm);
    }
}

/* a transformed row w -> its codes, stored as bytes code + offset (offset 128: unsigned, for oneDNN),
   then 16 * code + offset after them when dup16; returns the step */
static float quantize_row(const float* w, int64_t K, float ratio, const float* fixed, int64_t qmax,
                          int64_t dup16, int64_t offset, uint8_t* qr) {
    const int64_t qmin = -qmax - 1;
    float s;
    if (fixed) {
        s = *fixed;
    } else {
        uint32_t mbits = 0;  /* max |w| on the bits: for floats that are not NaN, |a| < |b| iff bits(|a|) < bits(|b|) */
        for (int64_t k = 0; k < K; k++) {
            uint32_t u;
            memcpy(&u, w + k, 4);
            u &= 0x7fffffffu;
            mbits = u > mbits ? u : mbits;
        }
        float amax;
        memcpy(&amax, &mbits, 4);
        s = amax * ratio / (float)qmax;
        s = s < 1e-12f ? 1e-12f : s;
    }
    for (int64_t k = 0; k < K; k++) {
        float c = rintf(w[k] / s);
        c = c < (float)qmin ? (float)qmin : c;
        c = c > (float)qmax ? (float)qmax : c;
        const int32_t v = (int32_t)c;
        qr[k] = (uint8_t)(v + offset);
        if (dup16) qr[K + k] = (uint8_t)(16 * v + offset);
    }
    return s;
}

/* act_quant: M rows x of K channels, T rows per sample, -> codes q (M x K, or M x 2K with dup16) and
   steps (M). center: each sample's mean over its rows is subtracted, and its transformed value
   ((mean / scale) * signs, rotated) written to mean_out (S x K); else a given mean (one row, or one per
   sample with mean_stride = K) or none. ratio / fixed: per-sample clip ratio or fixed step, or NULL.
   vt (K x r, or NULL): a low-rank branch's down-projection of the raw rows, written to lr_out (M x r). */
void act_quant(const float* x, float* steps, uint8_t* q, float* mean_out, int64_t M, int64_t K, int64_t T,
               int64_t center, const float* mean, int64_t mean_stride, const float* scale, const float* signs,
               const float* HK, int64_t K0, int64_t m, const float* ratio, const float* fixed,
               int64_t qmax, int64_t dup16, int64_t offset, const float* vt, int64_t rank, float* lr_out) {
    const int64_t ldq = dup16 ? 2 * K : K;
    if (vt) {                                             /* the branch first, 64 rows per task */
        #pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < M; b += 64)
            lowrank_down(x + b * K, K, M - b < 64 ? M - b : 64, vt, K, rank, lr_out + b * rank);
    }
    if (center) {
        #pragma omp parallel for schedule(static)
        for (int64_t si = 0; si < M / T; si++) {
            float mu[K + 16], w[K + 16];
            for (int64_t k = 0; k < K; k++) mu[k] = 0.0f;
            for (int64_t t = 0; t < T; t++)
                for (int64_t k = 0; k < K; k++) mu[k] += x[(si * T + t) * K + k];
            for (int64_t k = 0; k < K; k++) mu[k] /= (float)T;
            transform_row(mu, 0, scale, signs, HK, K0, m, K, mean_out + si * K);
            for (int64_t t = 0; t < T; t++) {
                const int64_t r = si * T + t;
                transform_row(x + r * K, mu, scale, signs, HK, K0, m, K, w);
                steps[r] = quantize_row(w, K, ratio ? ratio[si] : 1.0f, fixed ? fixed + si : 0, qmax, dup16,
                                        offset, q + r * ldq);
            }
        }
    } else {
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < M; r++) {
            const int64_t si = r / T;
            float w[K + 16];
            transform_row(x + r * K, mean ? mean + si * mean_stride : 0, scale, signs, HK, K0, m, K, w);
            steps[r] = quantize_row(w, K, ratio ? ratio[si] : 1.0f, fixed ? fixed + si : 0, qmax, dup16, offset,
                                    q + r * ldq);
        }
    }
}

/* exp(x) for the GELU: Cody-Waite reduction and Cephes' degree-6 polynomial, ~1 ulp; plain arithmetic,
   so the compiler vectorises the loop that calls it (libm's expf would be called once per element) */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, 4);
    return p * two_n;
}

/* gelu_quant: fc1's exact accumulator (int32 acc, or float acc_f holding integers) -> fc2's codes, one
   sample (T rows) at a time, its rows staying in cache:
     h = GELU(acc * st * ws + term[s]), GELU's tanh form computed as x / (1 + exp(-2u)),
     u = sqrt(2/pi) (x + 0.044715 x^3), term: fc1's bias and mean term (S x K, or one row),
   plus fc1's low-rank branch a1 U1 (a1: M x r1 from act_quant, U1 transposed r1 x K) before the GELU,
   then what act_quant does to h (with fc2's down-projection vt2, K x r2, of h into lr_out, M x r2). */
void gelu_quant(const int32_t* acc, const float* acc_f, const float* st, const float* ws, const float* term,
                int64_t term_stride, float* steps, uint8_t* q, float* mean_out, int64_t M, int64_t K, int64_t T,
                int64_t center, const float* mean, int64_t mean_stride, const float* scale, const float* signs,
                const float* HK, int64_t K0, int64_t m, const float* ratio, const float* fixed, int64_t qmax,
                int64_t dup16, int64_t offset, const float* a1, const float* u1t, int64_t r1, const float* vt2,
                int64_t r2, float* lr_out) {
    const int64_t ldq = dup16 ? 2 * K : K;
    #pragma omp parallel
    {
        float* h = malloc((size_t)(T * K + 32) * sizeof(float));  /* one sample's GELU output */
        float* w = malloc((size_t)(2 * K + 32) * sizeof(float));
        float* mu = w + K + 16;
        #pragma omp for schedule(static)
        for (int64_t si = 0; si < M / T; si++) {
            const float* tr = term ? term + si * term_stride : 0;
            for (int64_t t = 0; t < T; t++) {
                const int64_t r = si * T + t;
                float* hr = h + t * K;
                for (int64_t k = 0; k < K; k++) {
                    float y = (acc ? (float)acc[r * K + k] : acc_f[r * K + k]) * st[r] * ws[k];
                    hr[k] = tr ? y + tr[k] : y;
                }
            }
            if (u1t) lowrank_up(a1 + si * T * r1, T, u1t, r1, K, h);
            for (int64_t k = 0; k < T * K; k++) {
                const float y = h[k], u = 0.7978845608028654f * (y + 0.044715f * (y * y * y));
                h[k] = y / (1.0f + exp_poly(-2.0f * u));
            }
            if (vt2) lowrank_down(h, K, T, vt2, K, r2, lr_out + si * T * r2);
            const float* mrow = mean ? mean + si * mean_stride : 0;
            if (center) {
                for (int64_t k = 0; k < K; k++) mu[k] = 0.0f;
                for (int64_t t = 0; t < T; t++)
                    for (int64_t k = 0; k < K; k++) mu[k] += h[t * K + k];
                for (int64_t k = 0; k < K; k++) mu[k] /= (float)T;
                transform_row(mu, 0, scale, signs, HK, K0, m, K, mean_out + si * K);
                mrow = mu;
            }
            for (int64_t t = 0; t < T; t++) {
                const int64_t r = si * T + t;
                transform_row(h + t * K, mrow, scale, signs, HK, K0, m, K, w);
                steps[r] = quantize_row(w, K, ratio ? ratio[si] : 1.0f, fixed ? fixed + si : 0, qmax, dup16,
                                        offset, q + r * ldq);
            }
        }
        free(h);
        free(w);
    }
}
