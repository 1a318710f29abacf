/* normkit's CPU kernels: the five norms and the fused ops, forward and backward.
 *
 * Plain C11 + OpenMP, compiled on first use by normkit/backends/cpu/build.py and called through
 * ctypes with raw pointers. The kernel bodies live in kernels_impl.h, included once per data type
 * (float32, float64, bfloat16, float16); this file holds what is shared: the 16-bit conversions,
 * Chan's merge of partial moments, and the small per-group arithmetic done in double.
 *
 * Layout vocabulary. Row norms (LayerNorm, RMSNorm, the fused adds) see an (M, N) matrix of
 * contiguous rows. Channel norms (BatchNorm, InstanceNorm, GroupNorm) see (N, C, S) with S the
 * product of the spatial sizes, stored either channels-first ("NCHW": (n, c) owns a contiguous run
 * of S) or channels-last ("NHWC": each (n, s) owns a contiguous run of C).
 *
 * Statistics are computed in one read of the input without E[x^2] - E[x]^2: each cache-sized block
 * gets an exact two-pass mean and M2, and blocks are merged with Chan et al.'s pairwise formula.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t nk_bf16;
#if defined(__FLT16_MAX__)
typedef _Float16 nk_f16;
#define NK_HAVE_F16 1
#else
typedef uint16_t nk_f16;
#define NK_HAVE_F16 0
#endif

static inline float nk_bf16_load(nk_bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch does; NaN stays a (quiet) NaN */
static inline nk_bf16 nk_bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet = (u >> 16) | 0x40u;
    return (nk_bf16)(f != f ? quiet : rounded); /* a float compare: one instruction per vector */
}

#if NK_HAVE_F16
static inline float nk_f16_load(nk_f16 v) { return (float)v; }
static inline nk_f16 nk_f16_store(float f) { return (nk_f16)f; }
#else
/* no _Float16 in this compiler: IEEE half conversions by hand (slow, but correct) */
static inline float nk_f16_load(nk_f16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {
            float f = ldexpf((float)man, -24);
            memcpy(&u, &f, sizeof u);
            u |= sign;
        }
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline nk_f16 nk_f16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    float a = fabsf(f);
    if (a != a) return (nk_f16)(sign | 0x7e00u);
    if (a >= 65520.0f) return (nk_f16)(sign | 0x7c00u);
    if (a < 6.103515625e-05f) { /* subnormal: scale so that rint does the rounding */
        return (nk_f16)(sign | (uint32_t)rintf(a * 16777216.0f));
    }
    uint32_t au;
    memcpy(&au, &a, sizeof au);
    uint32_t r = au + 0xfffu + ((au >> 13) & 1u);
    return (nk_f16)(sign | ((r - (112u << 23)) >> 13));
}
#endif

/* expf that the compiler can vectorize (libm's expf is a scalar call): exp(x) = 2^k exp(r) with
 * k = round(x / ln 2), |r| <= ln(2) / 2, and a degree-6 polynomial for exp(r) (Cephes' coefficients);
 * about 2 ulp over the clamped range, which covers every input where SiLU is not already 0 or x. */
static inline __attribute__((always_inline)) float nk_expf(float x) {
    x = x > 87.0f ? 87.0f : (x < -87.0f ? -87.0f : x); /* 1 + e^87 stays where nk_rcpf is exact */
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* 1/d for d >= 1 without a divide (vdivps is the slowest vector instruction on many x86 cores):
 * a bit-pattern first guess, good to about 12%, then three Newton steps r <- r (2 - d r), each
 * doubling the correct bits: within 4e-7 relative over [1, 1e38] (above ~1.3e38 the guess goes
 * negative, which is why nk_expf clamps its argument at 87). */
static inline __attribute__((always_inline)) float nk_rcpf(float d) {
    int32_t i;
    memcpy(&i, &d, sizeof i);
    i = 0x7ef311c7 - i;
    float r;
    memcpy(&r, &i, sizeof r);
    r = r * (2.0f - d * r);
    r = r * (2.0f - d * r);
    r = r * (2.0f - d * r);
    return r;
}

static inline int nk_threads(int requested) { return requested > 0 ? requested : 1; }

/* Chan, Golub & LeVeque: merge (nb, mb, m2b) into (*na, *ma, *m2a). */
static inline void nk_merge(double *na, double *ma, double *m2a, double nb, double mb, double m2b) {
    if (nb <= 0) return;
    double n = *na + nb;
    double d = mb - *ma;
    *ma += d * (nb / n);
    *m2a += m2b + d * d * (*na * nb / n);
    *na = n;
}

/* A parameter gradient's element: the double sum stored as it is, or rounded to float (as_float: a
 * float32 parameter's gradient, written in its dtype so that the caller makes no converted copy). */
static inline void nk_put_grad(void *p, int as_float, int64_t i, double v) {
    if (as_float)
        ((float *)p)[i] = (float)v;
    else
        ((double *)p)[i] = v;
}

/* Per-thread partial column sums (nt rows of n doubles) -> dw and db (either may be NULL), summed
 * over the threads in a fixed order: the same result on every run. */
static void nk_sum_thread_partials(const double *part_w, const double *part_b, int nt, int64_t n, void *dw,
                                   void *db, int grads_float) {
    for (int64_t j = 0; j < n; j++) {
        double sw = 0, sb = 0;
        for (int t = 0; t < nt; t++) sw += part_w[t * n + j], sb += part_b[t * n + j];
        if (dw) nk_put_grad(dw, grads_float, j, sw);
        if (db) nk_put_grad(db, grads_float, j, sb);
    }
}

/* Per-(n, c) moments -> statistics of each normalization set.
 * groups > 0: a set is (n, group of C/groups channels) (GroupNorm, InstanceNorm), out has N*groups;
 * groups == 0: a set is channel c over every n (BatchNorm), out has C. Biased variance. */
static void nk_sets_from_nc(const double *mean_nc, const double *m2_nc, int64_t N, int64_t C, int64_t S,
                            int64_t groups, double *mean_out, double *var_out) {
    /* every (n, c) counts S, so each merge step has one count for all sets: nk_merge's arithmetic
     * runs across sets (channels, or groups), a vector at a time, in each set's serial order */
    int64_t sets = groups > 0 ? N * groups : C;
    for (int64_t k = 0; k < sets; k++) mean_out[k] = 0, var_out[k] = 0;
    if (S <= 0) {
        for (int64_t k = 0; k < sets; k++) var_out[k] = NAN;
        return;
    }
    int64_t steps = groups > 0 ? C / groups : N, width = groups > 0 ? groups : C;
    double cnt = 0, nb = (double)S;
    for (int64_t j = 0; j < steps; j++) {
        double tot = cnt + nb, fa = nb / tot, fq = cnt * nb / tot;
        for (int64_t n = 0; n < (groups > 0 ? N : 1); n++) {
            /* the j-th member of each set: channel g * D + j of sample n (groups), or sample j of channel c */
            const double *bm = groups > 0 ? mean_nc + n * C + j : mean_nc + j * C;
            const double *bq = groups > 0 ? m2_nc + n * C + j : m2_nc + j * C;
            double *m = mean_out + n * width, *q = var_out + n * width;
            int64_t stride = groups > 0 ? steps : 1;
#pragma omp simd
            for (int64_t k = 0; k < width; k++) {
                double d = bm[k * stride] - m[k];
                m[k] += d * fa;
                q[k] += bq[k * stride] + d * d * fq;
            }
        }
        cnt = tot;
    }
    for (int64_t k = 0; k < sets; k++) var_out[k] = cnt > 0 ? var_out[k] / cnt : NAN;
}

/* How many row blocks each sample's S positions are split into (channels-last), so that there is
 * work for every thread even with a small batch. */
static inline int64_t nk_row_blocks(int64_t N, int64_t S, int nt) {
    int64_t want = (4 * (int64_t)nt + N - 1) / (N > 0 ? N : 1);
    if (want < 1) want = 1;
    if (want > S) want = S > 0 ? S : 1;
    return want;
}

#define NK_BLOCK 2048  /* elements per exact two-pass block: fits L1 with room to spare */
#define NK_PAR_SLOTS 4096 /* (n, c) slots from which the backward's bookkeeping loops are threaded */
#define NK_SETS_PER_THREAD 4 /* sets a thread (a sample's group, a BatchNorm channel) from which each is done at once */
#define NK_GRAD_COLS 256  /* channels per block of the backward's parameter-gradient sums over the samples */
#define NK_SHORT_RUN 256  /* 16-bit runs up to this long take the channel norms' vector-accumulator sums */
#define NK_ROWS 65536  /* elements per channels-last sub-block (rows x C): its per-channel merge is amortized */
#define NK_FIRST_ROWS 16384 /* ... the statistics' first sub-block of a task, which may be summed twice */
#define NK_SUB_MAX 256 /* ... and at most this many rows, the terms of each float partial sum (few channels) */
/* rows per channels-last sub-block of C channels, of about `elements` elements */
static inline int64_t nk_rows_of(int64_t C, int64_t elements) {
    int64_t r = elements / C;
    return r < 1 ? 1 : (r > NK_SUB_MAX ? NK_SUB_MAX : r);
}
static inline int64_t nk_sub_rows(int64_t C) { return nk_rows_of(C, NK_ROWS); }
#define NK_CF_W 32     /* positions per tile of the channels-first row norms (vector lanes) */
#ifndef NK_CF_AHEAD
#define NK_CF_AHEAD 4  /* tiles ahead that the channels-first row norms prefetch */
#endif
#define NK_CF_CHUNK 32 /* channels per float partial sum there, before it is added in double */
/* rounding codes of the row forward (kernels_impl.h, nk_row_fwd); match kernels.py */
#define NK_ROUND_NONE 0
#define NK_ROUND_XHAT 1
#define NK_ROUND_RSTD 2
/* gate activations of the gated row forward (kernels_impl.h, nk_row_fwd); match kernels.py */
#define NK_GATE_SILU 1
#define NK_GATE_SIGMOID 2
/* activation codes of the channel-norm forward (kernels_impl.h, nk_act); match kernels.py */
#define NK_ACT_NONE 0
#define NK_ACT_SILU 1
#define NK_ACT_RELU 2
#define NK_ACT_HARDSWISH 3
#define NK_TILE 64     /* positions x channels per tile of the channels-last -> channels-first transpose */

/* ---- instantiate the kernels for each dtype ------------------------------------------------- */

/* NK_LOADV(v, p): one vector of NK_LANES values of NK_T at p (unaligned) into v, a vector of NK_A */
#define NK_LOADV_COPY(v, p) memcpy(&(v), (p), sizeof(v))
#define NK_LOADV_ELEMENTS(v, p, load)                                                                       \
    do {                                                                                                    \
        for (int l_ = 0; l_ < 8; l_++) (v)[l_] = load((p)[l_]);                                             \
    } while (0)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9) /* __builtin_convertvector */
typedef uint16_t nk_u16x8 __attribute__((vector_size(16)));
typedef uint32_t nk_u32x8 __attribute__((vector_size(32)));
/* bfloat16: the bits widened and shifted into a float's high half, eight at a time */
#define NK_LOADV_BF16(v, p)                                                                                 \
    do {                                                                                                    \
        nk_u16x8 h_;                                                                                        \
        memcpy(&h_, (p), sizeof h_);                                                                        \
        nk_u32x8 u_ = __builtin_convertvector(h_, nk_u32x8) << 16;                                          \
        memcpy(&(v), &u_, sizeof(v));                                                                       \
    } while (0)
#if NK_HAVE_F16
typedef _Float16 nk_f16x8 __attribute__((vector_size(16)));
#define NK_LOADV_F16(v, p)                                                                                  \
    do {                                                                                                    \
        nk_f16x8 h_;                                                                                        \
        memcpy(&h_, (p), sizeof h_);                                                                        \
        (v) = __builtin_convertvector(h_, __typeof__(v));                                                   \
    } while (0)
#endif
#endif
/* otherwise element by element (correct, slower) */
#ifndef NK_LOADV_BF16
#define NK_LOADV_BF16(v, p) NK_LOADV_ELEMENTS(v, p, nk_bf16_load)
#endif
#ifndef NK_LOADV_F16
#define NK_LOADV_F16(v, p) NK_LOADV_ELEMENTS(v, p, nk_f16_load)
#endif

/* The exported kernels take one argument: their arguments packed by the caller into consecutive 8-byte
 * slots, integers and pointers as int64 and floating-point values as double (kernels.py packs them with
 * struct). ctypes converting eighteen separate arguments took 4.4 µs a call, the packed one 1 µs. */
static inline int64_t nk_slot_i(const unsigned char *a, int k) {
    int64_t v;
    memcpy(&v, a + 8 * k, 8);
    return v;
}
static inline double nk_slot_d(const unsigned char *a, int k) {
    double v;
    memcpy(&v, a + 8 * k, 8);
    return v;
}
#define NK_SLOT_P(a, k) ((void *)(intptr_t)nk_slot_i(a, k))

#define NK_T float
#define NK_A float
#define NK_LOAD(v) (v)
#define NK_LOADV(v, p) NK_LOADV_COPY(v, p)
#define NK_STORE(v) (v)
#define NK_NAME(base) base##_f32
#define NK_RCP(v) nk_rcpf(v)
#define NK_EXP(v) nk_expf(v)
#include "kernels_impl.h"

#define NK_T double
#define NK_A double
#define NK_LOAD(v) (v)
#define NK_LOADV(v, p) NK_LOADV_COPY(v, p)
#define NK_STORE(v) (v)
#define NK_NAME(base) base##_f64
#define NK_RCP(v) (1.0 / (v))
#define NK_EXP(v) exp(v)
#include "kernels_impl.h"

#define NK_T nk_bf16
#define NK_A float
#define NK_LOAD(v) nk_bf16_load(v)
#define NK_LOADV(v, p) NK_LOADV_BF16(v, p)
#define NK_STORE(v) nk_bf16_store(v)
#define NK_NAME(base) base##_bf16
#define NK_RCP(v) nk_rcpf(v)
#define NK_EXP(v) nk_expf(v)
#include "kernels_impl.h"

#define NK_T nk_f16
#define NK_A float
#define NK_LOAD(v) nk_f16_load(v)
#define NK_LOADV(v, p) NK_LOADV_F16(v, p)
#define NK_STORE(v) nk_f16_store(v)
#define NK_NAME(base) base##_f16
#define NK_RCP(v) nk_rcpf(v)
#define NK_EXP(v) nk_expf(v)
#include "kernels_impl.h"

int nk_abi_version(void) { return 4; }
int nk_has_native_f16(void) { return NK_HAVE_F16; }
int nk_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
