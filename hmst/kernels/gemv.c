/* Few-row fp32 matmul for CPU decoding: y (M, O) = x (M, I) @ w (O, I)^T, M <= 4.
 *
 * Decoding a token reads every active weight once for one (or a few) rows: the time is
 * the weight bytes over the memory bandwidth. MKL's kernels for that shape reach about
 * half of what one core can stream here (BENCHMARKS.md); this one walks w once, a few
 * rows at a time, and keeps the M rows of x (a few KB) in L1. GCC/Clang vector
 * extensions, so it compiles to AVX-512, AVX2 or NEON from the same source
 * (hmst/kernels/native.py builds it with -O3 -march=native at first use).
 * The pure-PyTorch reference is F.linear (tests compare the two).
 */
#include <math.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline float sum16(v16 v) {
    float s = 0.0f;
    for (int k = 0; k < 16; k++) s += v[k];
    return s;
}

/* ROWS rows of w per block (ROWS streams from memory at once) and a software prefetch
 * PF floats ahead (0: none), per row count M: measured best at 1 thread on the
 * reference machine (AMD EPYC, AVX-512; 768-8192 x 256 and 256 x 1024 weights from
 * memory): M=1 8 rows, no prefetch, 28-33 GB/s; M=2 4 rows, 1024; M=3-4 2 rows, 2048
 * (more accumulators spill registers). */
#define DEFINE_KERNEL(MM, ROWS, PF)                                                 \
    static void gemv_##MM(const float *restrict w, const float *restrict x,         \
                          float *restrict y, long O, long I) {                      \
        long o = 0;                                                                 \
        for (; o + ROWS <= O; o += ROWS) {                                          \
            const float *wo = w + o * I;                                            \
            v16 acc[ROWS][MM];                                                      \
            memset(acc, 0, sizeof acc);                                             \
            long i = 0;                                                             \
            for (; i + 16 <= I; i += 16) {                                          \
                v16 wv[ROWS];                                                       \
                for (int r = 0; r < ROWS; r++) {                                    \
                    if (PF) __builtin_prefetch(wo + r * I + i + PF);                \
                    wv[r] = load16(wo + r * I + i);                                 \
                }                                                                   \
                for (int m = 0; m < MM; m++) {                                      \
                    v16 xv = load16(x + m * I + i);                                 \
                    for (int r = 0; r < ROWS; r++) acc[r][m] += wv[r] * xv;         \
                }                                                                   \
            }                                                                       \
            for (int r = 0; r < ROWS; r++)                                          \
                for (int m = 0; m < MM; m++) {                                      \
                    float s = sum16(acc[r][m]);                                     \
                    for (long j = i; j < I; j++) s += wo[r * I + j] * x[m * I + j]; \
                    y[m * O + o + r] = s;                                           \
                }                                                                   \
        }                                                                           \
        for (; o < O; o++)                                                          \
            for (int m = 0; m < MM; m++) {                                          \
                float s = 0.0f;                                                     \
                for (long j = 0; j < I; j++) s += w[o * I + j] * x[m * I + j];      \
                y[m * O + o] = s;                                                   \
            }                                                                       \
    }

DEFINE_KERNEL(1, 8, 0)
DEFINE_KERNEL(2, 4, 1024)
DEFINE_KERNEL(3, 2, 2048)
DEFINE_KERNEL(4, 2, 2048)

/* Returns 0 on success, -1 if M is outside 1..4. */
int hmst_gemv(const float *w, const float *x, float *y, long O, long I, long M) {
    switch (M) {
    case 1: gemv_1(w, x, y, O, I); return 0;
    case 2: gemv_2(w, x, y, O, I); return 0;
    case 3: gemv_3(w, x, y, O, I); return 0;
    case 4: gemv_4(w, x, y, O, I); return 0;
    default: return -1;
    }
}

/* One token through a SwiGLU expert: y (D) = w2 (D, F) @ (silu(g) * u), where
 * (g, u) = w13 (2F, D) @ x (D) split in halves (hmst.models.layers.SwiGLU). The 2F
 * hidden values live in `h` (caller's scratch, 2F floats). Returns 0, or -1 when
 * F <= 0. */
int hmst_swiglu(const float *w13, const float *w2, const float *x, float *h, float *y,
                long D, long F) {
    if (F <= 0) return -1;
    gemv_1(w13, x, h, 2 * F, D);
    for (long j = 0; j < F; j++) {
        float g = h[j];
        h[j] = g / (1.0f + expf(-g)) * h[F + j];
    }
    gemv_1(w2, h, y, D, F);
    return 0;
}
