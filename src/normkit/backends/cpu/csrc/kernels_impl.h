/* Kernel bodies, included by kernels.c once per dtype with:
 *   NK_T      the storage type (float, double, nk_bf16, nk_f16)
 *   NK_A      the arithmetic type (double for double, float otherwise)
 *   NK_LOAD   NK_T -> NK_A,  NK_STORE  NK_A -> NK_T (round to nearest even)
 *   NK_NAME   appends the dtype suffix to a function name
 *   NK_EXP    exp in NK_A
 *   NK_RCP    1 / v in NK_A, for v >= 1
 * Statistics of the channel norms and every cross-row reduction (parameter gradients) are
 * accumulated in double; per-row and per-block work runs in NK_A, vectorized by the compiler.
 */

/* silu(z) and its derivative, d silu / dz = s(z) (1 + z (1 - s(z))) */
static inline __attribute__((always_inline)) NK_A NK_NAME(nk_sigmoid)(NK_A z) { return NK_RCP((NK_A)1 + NK_EXP(-z)); }

/* ============================ reductions over L1 =================================== */

/* Sums over a buffer already in L1 are bound by the latency of one accumulator chain (a
 * `#pragma omp simd reduction` keeps a single vector accumulator); four independent vector
 * accumulators (GCC/Clang vector extensions) run about three times faster on the rows of a norm. */
typedef NK_A NK_NAME(nk_vec) __attribute__((vector_size(32)));
#define NK_LANES ((int64_t)(32 / sizeof(NK_A)))

static inline NK_A NK_NAME(nk_hsum)(const NK_NAME(nk_vec) *v) {
    NK_A r = 0;
    for (int64_t i = 0; i < NK_LANES; i++) r += (*v)[i];
    return r;
}

/* A vector's lanes added as a tree (log2(lanes) dependent adds; a `#pragma omp simd reduction` adds them
 * one after another, through memory, which on the short runs of small images cost as much as the run) */
static inline NK_A NK_NAME(nk_hsum_tree)(NK_NAME(nk_vec) v) {
    NK_A t[NK_LANES];
    memcpy(t, &v, sizeof t);
    for (int64_t w = NK_LANES / 2; w > 0; w /= 2)
        for (int64_t i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

/* sum of (a[j] - k) */
static inline NK_A NK_NAME(nk_sum_sub)(const NK_A *a, int64_t n, NK_A k) {
    NK_NAME(nk_vec) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, v0, v1, v2, v3, kk;
    for (int64_t i = 0; i < NK_LANES; i++) kk[i] = k;
    int64_t j = 0;
    for (; j + 4 * NK_LANES <= n; j += 4 * NK_LANES) {
        memcpy(&v0, a + j, 32), memcpy(&v1, a + j + NK_LANES, 32);
        memcpy(&v2, a + j + 2 * NK_LANES, 32), memcpy(&v3, a + j + 3 * NK_LANES, 32);
        s0 += v0 - kk, s1 += v1 - kk, s2 += v2 - kk, s3 += v3 - kk;
    }
    for (; j + NK_LANES <= n; j += NK_LANES) { /* short rows: one vector at a time, not scalars */
        memcpy(&v0, a + j, 32);
        s0 += v0 - kk;
    }
    NK_NAME(nk_vec) total = (s0 + s1) + (s2 + s3);
    NK_A r = NK_NAME(nk_hsum)(&total);
    for (; j < n; j++) r += a[j] - k;
    return r;
}

/* sum of a[j] * b[j] */
static inline NK_A NK_NAME(nk_dot)(const NK_A *a, const NK_A *b, int64_t n) {
    NK_NAME(nk_vec) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, a0, a1, a2, a3, b0, b1, b2, b3;
    int64_t j = 0;
    for (; j + 4 * NK_LANES <= n; j += 4 * NK_LANES) {
        memcpy(&a0, a + j, 32), memcpy(&a1, a + j + NK_LANES, 32);
        memcpy(&a2, a + j + 2 * NK_LANES, 32), memcpy(&a3, a + j + 3 * NK_LANES, 32);
        memcpy(&b0, b + j, 32), memcpy(&b1, b + j + NK_LANES, 32);
        memcpy(&b2, b + j + 2 * NK_LANES, 32), memcpy(&b3, b + j + 3 * NK_LANES, 32);
        s0 += a0 * b0, s1 += a1 * b1, s2 += a2 * b2, s3 += a3 * b3;
    }
    for (; j + NK_LANES <= n; j += NK_LANES) {
        memcpy(&a0, a + j, 32), memcpy(&b0, b + j, 32);
        s0 += a0 * b0;
    }
    NK_NAME(nk_vec) total = (s0 + s1) + (s2 + s3);
    NK_A r = NK_NAME(nk_hsum)(&total);
    for (; j < n; j++) r += a[j] * b[j];
    return r;
}

/* sums of d = a[j] - k and of d^2, in one read (four vector accumulators each) */
static inline void NK_NAME(nk_sum_sub2)(const NK_A *a, int64_t n, NK_A k, NK_A *sum, NK_A *sum_sq) {
    NK_NAME(nk_vec) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    NK_NAME(nk_vec) v0, v1, v2, v3, kk;
    for (int64_t i = 0; i < NK_LANES; i++) kk[i] = k;
    int64_t j = 0;
    for (; j + 4 * NK_LANES <= n; j += 4 * NK_LANES) {
        memcpy(&v0, a + j, 32), memcpy(&v1, a + j + NK_LANES, 32);
        memcpy(&v2, a + j + 2 * NK_LANES, 32), memcpy(&v3, a + j + 3 * NK_LANES, 32);
        v0 -= kk, v1 -= kk, v2 -= kk, v3 -= kk;
        s0 += v0, s1 += v1, s2 += v2, s3 += v3;
        q0 += v0 * v0, q1 += v1 * v1, q2 += v2 * v2, q3 += v3 * v3;
    }
    for (; j + NK_LANES <= n; j += NK_LANES) {
        memcpy(&v0, a + j, 32);
        v0 -= kk;
        s0 += v0, q0 += v0 * v0;
    }
    NK_NAME(nk_vec) ts = (s0 + s1) + (s2 + s3), tq = (q0 + q1) + (q2 + q3);
    NK_A rs = NK_NAME(nk_hsum)(&ts), rq = NK_NAME(nk_hsum)(&tq);
    for (; j < n; j++) {
        NK_A d = a[j] - k;
        rs += d, rq += d * d;
    }
    *sum = rs, *sum_sq = rq;
}

/* LayerNorm's statistics of a row in L1, from one read: sums of d = x - k and d^2 about k = the
 * first element give the mean k + e (e = mean(d)) and var = mean(d^2) - e^2, which is within about
 * (1 + e^2 / var) ulps of exact, so where the first element lies far out (e^2 > 8 var) the sums
 * are taken once more about the mean just found. Returns the mean (double); *var gets the biased
 * variance. The forward and the backward call this same function and so agree bit for bit. */
static inline double NK_NAME(nk_row_moments)(const NK_A *buf, int64_t n, double *var) {
    NK_A k = buf[0], s, q;
    double mean = 0;
    for (int pass = 0; pass < 2; pass++) {
        NK_NAME(nk_sum_sub2)(buf, n, k, &s, &q);
        double e = (double)s / (double)n;
        mean = (double)k + e;
        *var = (double)q / (double)n - e * e;
        if (e * e <= 8.0 * *var) break;
        k = (NK_A)mean;
    }
    if (*var < 0) *var = 0;
    return mean;
}

/* ================================ row norms ======================================== */

/* The gate's activation in NK_A: nk_sigmoid (as GroupNorm+SiLU computes it, no divide), times g for SiLU. */
static inline __attribute__((always_inline)) NK_A NK_NAME(nk_gate)(NK_A g, int sigmoid) {
    NK_A s = NK_NAME(nk_sigmoid)(g);
    return sigmoid ? s : g * s;
}

/* The gated row forward of nk_row_fwd (see there). gate_first: the row is x * act(gate) in NK_A before it
 * is normalized (Mamba-2's order), and the output is the norm's; otherwise the norm's values, before their
 * last rounding, go to a row buffer and the gate's product is rounded once as it is written. Row i's
 * weight and bias start at element (i % wgroups) * N: a norm over groups of N elements of a longer row
 * whose weight spans the whole row is rows of N, wgroups to a row. The exponential is most of the work. */
static void NK_NAME(nk_row_fwd_gated)(const NK_T *x, const NK_A *w0, const NK_A *b0, NK_T *y, NK_A *rstd_out,
                                      int64_t M, int64_t N, double eps, int rms, int rounding, const NK_T *gate,
                                      int gate_act, int gate_first, int64_t wgroups, int nt) {
    const int sig = gate_act == NK_GATE_SIGMOID;
#pragma omp parallel num_threads(nk_threads(nt))
    {
        NK_A *buf = (NK_A *)malloc(sizeof(NK_A) * (size_t)(N > 0 ? N : 1));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M; i++) {
            const NK_T *xr = x + i * N, *gr = gate + i * N;
            NK_T *yr = y + i * N;
            const int64_t wo = wgroups > 1 ? (i % wgroups) * N : 0;
            const NK_A *w = w0 ? w0 + wo : NULL, *b = b0 ? b0 + wo : NULL;
            if (gate_first) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) buf[j] = NK_LOAD(xr[j]) * NK_NAME(nk_gate)(NK_LOAD(gr[j]), sig);
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) buf[j] = NK_LOAD(xr[j]);
            }
            double var = 0, mean_d = rms ? 0.0 : NK_NAME(nk_row_moments)(buf, N, &var);
            NK_A mean = (NK_A)mean_d, mean_lo = (NK_A)(mean_d - (double)mean), rstd;
            if (rms)
                rstd = (NK_A)(1.0 / sqrt((double)NK_NAME(nk_dot)(buf, buf, N) / (double)N + eps));
            else
                rstd = (NK_A)(1.0 / sqrt(var + eps));
            if (rstd_out) rstd_out[i] = rstd;
            /* the norm's value, in place of the row (each j read before it is written); with XHAT already
             * rounded, so that rounding it again below is exact */
            if (w && rounding == NK_ROUND_XHAT) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++)
                    buf[j] = NK_LOAD(NK_STORE(NK_LOAD(NK_STORE(((buf[j] - mean) - mean_lo) * rstd)) * w[j]));
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) {
                    NK_A v = ((buf[j] - mean) - mean_lo) * rstd;
                    if (w) v = v * w[j];
                    if (b) v = v + b[j];
                    buf[j] = v;
                }
            }
            if (gate_first) { /* the norm of the gated row is the output */
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(buf[j]);
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(buf[j] * NK_NAME(nk_gate)(NK_LOAD(gr[j]), sig));
            }
        }
        free(buf);
    }
}

/* LayerNorm (rms = 0) or RMSNorm (rms = 1) over rows of length N; with res != NULL, the row is
 * first h = round(x + res), written to hout (the fused residual add). rstd_out gets one value per
 * row (the mean is recomputed by the backward). rounding: what a two-step composition in the data
 * type rounds before its last multiply:
 *   NK_ROUND_XHAT (a weight and no bias): y = round(round(xhat) * w), the normalized value rounded
 *     to the data type before the weight multiplies it (Hugging Face's Llama RMSNorm);
 *   NK_ROUND_RSTD (RMSNorm, neither weight nor bias): y = round(x * round(rstd)), the scale rounded
 *     to the data type before it multiplies x (DeepSeek-V4's weightless RMSNorm; x times a 16-bit
 *     value is exact in float, so the one rounding left is the product's).
 * In float32 and float64 every rounding but the last is the identity.
 * gate != NULL (not with NK_ROUND_RSTD or a residual; gate_act NK_GATE_SILU or NK_GATE_SIGMOID): the gated
 * norms of linear-attention layers, y = round(v * act(gate)) with v the value above before its last
 * rounding (NK_ROUND_XHAT: after it, as the composition rounds the norm before the gate's product), or
 * with gate_first the norm of x * act(gate); wgroups: see nk_row_fwd_gated. */
static void NK_NAME(nk_row_fwd_impl)(const NK_T *x, const NK_T *res, NK_T *hout, const NK_A *w, const NK_A *b,
                                     NK_T *y, NK_A *rstd_out, int64_t M, int64_t N, double eps, int rms, int rounding,
                                     const NK_T *gate, int gate_act, int gate_first, int64_t wgroups, int nt) {
    if (gate) {
        NK_NAME(nk_row_fwd_gated)(x, w, b, y, rstd_out, M, N, eps, rms, rounding, gate, gate_act, gate_first,
                                  wgroups, nt);
        return;
    }
#pragma omp parallel num_threads(nk_threads(nt))
    {
        NK_A *buf = (NK_A *)malloc(sizeof(NK_A) * (size_t)(N > 0 ? N : 1));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M; i++) {
            const NK_T *xr = x + i * N;
            NK_T *yr = y + i * N;
            /* LayerNorm's statistics: nk_row_moments (shifted sums, so float rounding is relative
             * to the row's spread, not to its mean). RMSNorm sums x^2. */
            NK_A sum = 0;
            const NK_A *row = buf;
            if (res) { /* h = round(x + residual) is written out and normalized */
                const NK_T *rr = res + i * N;
                NK_T *hr = hout + i * N;
#pragma omp simd
                for (int64_t j = 0; j < N; j++) {
                    NK_T h = NK_STORE(NK_LOAD(xr[j]) + NK_LOAD(rr[j]));
                    hr[j] = h;
                    buf[j] = NK_LOAD(h);
                }
            } else if (sizeof(NK_T) == sizeof(NK_A)) {
                row = (const NK_A *)xr; /* float or double data: read in place, no copy */
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) buf[j] = NK_LOAD(xr[j]);
            }
            if (rms) sum = NK_NAME(nk_dot)(row, row, N);
            NK_A rstd;
            double var = 0, mean_d = rms ? 0.0 : NK_NAME(nk_row_moments)(row, N, &var);
            /* centre by mean = hi + lo: (x - hi) is exact near the mean, lo restores the bits float lost */
            NK_A mean = (NK_A)mean_d, mean_lo = (NK_A)(mean_d - (double)mean);
            if (rms) {
                rstd = (NK_A)(1.0 / sqrt((double)sum / (double)N + eps));
            } else {
                rstd = (NK_A)(1.0 / sqrt(var + eps));
            }
            if (rstd_out) rstd_out[i] = rstd; /* NULL: inference, nothing saved for a backward */
            if (rounding == NK_ROUND_RSTD) {
                NK_A scale = NK_LOAD(NK_STORE(rstd));
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(row[j] * scale);
            } else if (w && b) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(((row[j] - mean) - mean_lo) * rstd * w[j] + b[j]);
            } else if (w && rounding == NK_ROUND_XHAT) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(NK_LOAD(NK_STORE(((row[j] - mean) - mean_lo) * rstd)) * w[j]);
            } else if (w) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(((row[j] - mean) - mean_lo) * rstd * w[j]);
            } else if (b) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(((row[j] - mean) - mean_lo) * rstd + b[j]);
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) yr[j] = NK_STORE(((row[j] - mean) - mean_lo) * rstd);
            }
        }
        free(buf);
    }
}

/* Backward of nk_row_fwd. dx = rstd * (g - mean(g) - xhat * mean(g xhat)) with g = dy * w (RMSNorm:
 * no mean(g) term), plus dh (the gradient reaching the residual output h) when given.
 * The row mean is recomputed here, exactly as the forward computed it (x is read anyway, and a
 * float32 mean saved for backward would lose the bits that centre a row with a large mean), so
 * the forward saves only rstd. dw and db (may be NULL) get the column sums of dy * xhat and dy, in
 * double, or rounded to float with grads_float (nk_put_grad). */
static void NK_NAME(nk_row_bwd_impl)(const NK_T *x, const NK_T *dy, const NK_T *dh, const NK_A *w,
                                     const NK_A *rstd_in, NK_T *dx, void *dw, void *db, int grads_float, int64_t M,
                                     int64_t N, int rms, int nt) {
    nt = nk_threads(nt);
    /* every loop below is free of selects (a loop-invariant `w ? ... : ...` or `if (dw)` inside a
     * simd loop made the compiler unswitch it into scalar code): a missing weight is a vector of
     * ones, and the column partials are always accumulated */
    NK_A *ones = NULL;
    if (!w) {
        ones = (NK_A *)malloc(sizeof(NK_A) * (size_t)(N > 0 ? N : 1));
        for (int64_t j = 0; j < N; j++) ones[j] = 1;
        w = ones;
    }
    double *part_w = (double *)calloc((size_t)nt * (size_t)N + 1, sizeof(double));
    double *part_b = (double *)calloc((size_t)nt * (size_t)N + 1, sizeof(double));
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        NK_A *xh = (NK_A *)malloc(sizeof(NK_A) * (size_t)(N > 0 ? N : 1));
        NK_A *gy = (NK_A *)malloc(sizeof(NK_A) * (size_t)(N > 0 ? N : 1));
        /* per-thread column partials, flushed to double every few rows to keep float sums short */
        NK_A *acc_w = (NK_A *)calloc((size_t)(N > 0 ? N : 1), sizeof(NK_A));
        NK_A *acc_b = (NK_A *)calloc((size_t)(N > 0 ? N : 1), sizeof(NK_A));
        int pending = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M; i++) {
            const NK_T *xr = x + i * N, *dyr = dy + i * N;
            NK_T *dxr = dx + i * N;
            NK_A rstd = rstd_in[i];
#pragma omp simd
            for (int64_t j = 0; j < N; j++) xh[j] = NK_LOAD(xr[j]);
            double var, mean_d = rms ? 0.0 : NK_NAME(nk_row_moments)(xh, N, &var);
            NK_A mean = (NK_A)mean_d, mean_lo = (NK_A)(mean_d - (double)mean);
#pragma omp simd
            for (int64_t j = 0; j < N; j++) {
                NK_A xhat = ((xh[j] - mean) - mean_lo) * rstd;
                NK_A d = NK_LOAD(dyr[j]);
                xh[j] = xhat;
                gy[j] = d * w[j];
                acc_w[j] += d * xhat;
                acc_b[j] += d;
            }
            NK_A c1 = NK_NAME(nk_sum_sub)(gy, N, 0), c2 = NK_NAME(nk_dot)(gy, xh, N);
            c1 = rms ? 0 : c1 / (NK_A)N;
            c2 = c2 / (NK_A)N;
            if (dh) {
                const NK_T *dhr = dh + i * N;
#pragma omp simd
                for (int64_t j = 0; j < N; j++) dxr[j] = NK_STORE(rstd * (gy[j] - c1 - xh[j] * c2) + NK_LOAD(dhr[j]));
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) dxr[j] = NK_STORE(rstd * (gy[j] - c1 - xh[j] * c2));
            }
            if (++pending == 16) {
                pending = 0;
                for (int64_t j = 0; j < N; j++) part_w[tid * N + j] += acc_w[j], acc_w[j] = 0;
                for (int64_t j = 0; j < N; j++) part_b[tid * N + j] += acc_b[j], acc_b[j] = 0;
            }
        }
        for (int64_t j = 0; j < N; j++) part_w[tid * N + j] += acc_w[j];
        for (int64_t j = 0; j < N; j++) part_b[tid * N + j] += acc_b[j];
        free(xh);
        free(gy);
        free(acc_w);
        free(acc_b);
    }
    nk_sum_thread_partials(part_w, part_b, nt, N, dw, db, grads_float);
    free(part_w);
    free(part_b);
    free(ones);
}

/* ================================ channel norms ==================================== */

/* Mean and M2 of a contiguous run, one L1-sized block at a time, merged with Chan's formula.
 * Each block is read once, as sums of d = x - K and d^2 about a shift K close to the mean (the
 * running mean so far; the block's first element for the first block): M2 = sum d^2 - n e^2 with
 * e = mean(d) loses nothing while n e^2 is small against sum d^2. Where it is not (a first
 * element far out in the tail), the block is summed once more about its own mean. */
static void NK_NAME(nk_run_moments)(const NK_T *p, int64_t S, double *mean, double *m2) {
    double cnt = 0, m = 0, q = 0;
    for (int64_t s0 = 0; s0 < S; s0 += NK_BLOCK) {
        int64_t len = S - s0 < NK_BLOCK ? S - s0 : NK_BLOCK;
        NK_A k = cnt > 0 ? (NK_A)m : NK_LOAD(p[s0]), sd, sd2;
        double e;
        for (int pass = 0;; pass++) { /* a second pass only when the shift was far off */
            sd = 0, sd2 = 0;
            if (sizeof(NK_T) == sizeof(NK_A) || len <= NK_SHORT_RUN) {
                /* vector accumulators added as a tree (see nk_sums_run_vec): the simd reduction's lane-by-
                 * lane epilogue costs as much as a short run (InstanceNorm and BatchNorm on small images) */
                NK_NAME(nk_vec) v1 = {0}, v2 = {0}, w1 = {0}, w2 = {0}, kk, xv, yv;
                for (int64_t l = 0; l < NK_LANES; l++) kk[l] = k;
                int64_t j = 0;
                for (; j + 2 * NK_LANES <= len; j += 2 * NK_LANES) { /* two accumulators: two add chains */
                    NK_LOADV(xv, p + s0 + j);
                    NK_LOADV(yv, p + s0 + j + NK_LANES);
                    xv -= kk, yv -= kk;
                    v1 += xv, v2 += xv * xv, w1 += yv, w2 += yv * yv;
                }
                for (; j + NK_LANES <= len; j += NK_LANES) {
                    NK_LOADV(xv, p + s0 + j);
                    xv -= kk;
                    v1 += xv, v2 += xv * xv;
                }
                sd = NK_NAME(nk_hsum_tree)(v1 + w1), sd2 = NK_NAME(nk_hsum_tree)(v2 + w2);
                for (; j < len; j++) {
                    NK_A d = NK_LOAD(p[s0 + j]) - k;
                    sd += d, sd2 += d * d;
                }
            } else {
#pragma omp simd reduction(+ : sd, sd2)
                for (int64_t j = 0; j < len; j++) {
                    NK_A d = NK_LOAD(p[s0 + j]) - k;
                    sd += d;
                    sd2 += d * d;
                }
            }
            e = (double)sd / (double)len;
            if (pass == 1 || (double)len * e * e <= 0.5 * (double)sd2) break;
            k = (NK_A)((double)k + e);
        }
        nk_merge(&cnt, &m, &q, (double)len, (double)k + e, (double)sd2 - (double)len * e * e);
    }
    *mean = m;
    *m2 = q;
}

/* Per-(n, c) mean and M2 of an (N, C, S) tensor in either layout. */
static void NK_NAME(nk_nc_moments)(const NK_T *x, int64_t N, int64_t C, int64_t S, int nhwc, double *mean_nc,
                                   double *m2_nc, int nt) {
    if (!nhwc) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t nc = 0; nc < N * C; nc++) NK_NAME(nk_run_moments)(x + nc * S, S, mean_nc + nc, m2_nc + nc);
        return;
    }
    /* channels-last: each task reduces a block of rows of one sample over all C channels */
    int64_t B = nk_row_blocks(N, S, nt);
    int64_t rows_per_block = (S + B - 1) / B;
    /* rows per sub-block: about NK_ROWS elements (a merge per channel per sub-block: larger blocks cost
     * fewer, 1.25-1.56x for BatchNorm at 8x1024x14x14 and 8x2048x7x7), but about NK_FIRST_ROWS for a
     * task's first, whose shift is its first row and which is summed twice when that row was far off */
    int64_t sub = nk_sub_rows(C), first_sub = nk_rows_of(C, NK_FIRST_ROWS);
    double *pm = (double *)malloc(sizeof(double) * (size_t)(N * B * C + 1));
    double *pq = (double *)malloc(sizeof(double) * (size_t)(N * B * C + 1));
    double *pc = (double *)malloc(sizeof(double) * (size_t)(N * B + 1));
#pragma omp parallel num_threads(nt)
    {
        NK_A *bs = (NK_A *)malloc(sizeof(NK_A) * (size_t)C), *bk = (NK_A *)malloc(sizeof(NK_A) * (size_t)C);
        NK_A *bq = (NK_A *)malloc(sizeof(NK_A) * (size_t)C);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * B; task++) {
            int64_t n = task / B, b = task % B;
            int64_t r0 = b * rows_per_block, r1 = r0 + rows_per_block < S ? r0 + rows_per_block : S;
            double *m = pm + task * C, *q = pq + task * C;
            double cnt = 0;
            for (int64_t c = 0; c < C; c++) m[c] = 0, q[c] = 0;
            for (int64_t s0 = r0, s1; s0 < r1; s0 = s1) {
                int64_t rows = cnt > 0 ? sub : first_sub;
                s1 = s0 + rows < r1 ? s0 + rows : r1;
                double len = (double)(s1 - s0);
                /* about a shift per channel, as in nk_run_moments: the running mean (the
                 * sub-block's first row at first), and once more about the sub-block's own mean
                 * when that was far off for any channel */
                const NK_T *first = x + (n * S + s0) * C;
                for (int64_t c = 0; c < C; c++) bk[c] = cnt > 0 ? (NK_A)m[c] : NK_LOAD(first[c]);
                for (int pass = 0;; pass++) {
                    for (int64_t c = 0; c < C; c++) bs[c] = 0, bq[c] = 0;
                    for (int64_t s = s0; s < s1; s++) {
                        const NK_T *row = x + (n * S + s) * C;
#pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            NK_A d = NK_LOAD(row[c]) - bk[c];
                            bs[c] += d;
                            bq[c] += d * d;
                        }
                    }
                    int far = 0;
                    for (int64_t c = 0; c < C; c++) {
                        double e = (double)bs[c] / len;
                        far |= len * e * e > 0.5 * (double)bq[c];
                    }
                    if (pass == 1 || !far) break;
                    for (int64_t c = 0; c < C; c++) bk[c] = (NK_A)((double)bk[c] + (double)bs[c] / len);
                }
                /* Chan's merge; the counts are the same for every channel */
                double nb = len, tot = cnt + nb, fa = nb / tot, fq = cnt * nb / tot;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    double e = (double)bs[c] / nb;
                    double d = (double)bk[c] + e - m[c];
                    m[c] += d * fa;
                    q[c] += (double)bq[c] - nb * e * e + d * d * fq;
                }
                cnt = tot;
            }
            pc[task] = cnt;
        }
        free(bs);
        free(bk);
        free(bq);
    }
    /* the blocks of a sample, merged in order; a block's count is the same for every channel, so
     * the merge runs across channels (nk_merge's arithmetic, one vector of channels at a time) */
    for (int64_t n = 0; n < N; n++) {
        double *m = mean_nc + n * C, *q = m2_nc + n * C, cnt = 0;
        for (int64_t c = 0; c < C; c++) m[c] = 0, q[c] = 0;
        for (int64_t b = 0; b < B; b++) {
            int64_t t = n * B + b;
            double nb = pc[t];
            if (nb <= 0) continue;
            double tot = cnt + nb, fa = nb / tot, fq = cnt * nb / tot;
            const double *bm = pm + t * C, *bq = pq + t * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                double d = bm[c] - m[c];
                m[c] += d * fa;
                q[c] += bq[c] + d * d * fq;
            }
            cnt = tot;
        }
    }
    free(pm);
    free(pq);
    free(pc);
}

/* The activation applied to the normalized value z in the forward kernels: act is NK_ACT_NONE,
 * NK_ACT_SILU (GroupNorm+SiLU, forward and backward), NK_ACT_RELU or NK_ACT_HARDSWISH (inference
 * only: BatchNorm followed by its activation, as timm's BatchNormAct2d). Each loop below is
 * instantiated once per code, so no simd loop carries a runtime branch. */
static inline __attribute__((always_inline)) NK_A NK_NAME(nk_act)(NK_A z, const int act) {
    if (act == NK_ACT_SILU) /* -inf * sigmoid(-inf) is NaN in torch; the clamped exp would give -inf */
        return z == -(NK_A)INFINITY ? z * (NK_A)0 : z * NK_NAME(nk_sigmoid)(z);
    if (act == NK_ACT_RELU) return z < (NK_A)0 ? (NK_A)0 : z; /* NaN stays NaN, as torch.relu keeps it */
    if (act == NK_ACT_HARDSWISH) { /* torch's formula: x * min(max(x + 3, 0), 6) / 6 */
        NK_A t = z + (NK_A)3;
        t = t > (NK_A)0 ? t : (NK_A)0;
        t = t < (NK_A)6 ? t : (NK_A)6;
        return z * t / (NK_A)6;
    }
    return z;
}

/* one run of S values of one (n, c), channels-first */
static inline __attribute__((always_inline)) void NK_NAME(nk_apply_run)(const NK_T *xr, NK_T *yr, int64_t S, NK_A mh,
                                                                        NK_A a, NK_A b, const int act) {
#pragma omp simd
    for (int64_t s = 0; s < S; s++) yr[s] = NK_STORE(NK_NAME(nk_act)((NK_LOAD(xr[s]) - mh) * a + b, act));
}

/* one position's C values, channels-last */
static inline __attribute__((always_inline)) void NK_NAME(nk_apply_row)(const NK_T *xr, NK_T *yr, int64_t C,
                                                                        const NK_A *mh, const NK_A *a, const NK_A *b,
                                                                        const int act) {
#pragma omp simd
    for (int64_t c = 0; c < C; c++) yr[c] = NK_STORE(NK_NAME(nk_act)((NK_LOAD(xr[c]) - mh[c]) * a[c] + b[c], act));
}

/* positions s0..s1 of one channel, read channels-last and written channels-first */
static inline __attribute__((always_inline)) void NK_NAME(nk_apply_strided)(const NK_T *xc, NK_T *yc, int64_t C,
                                                                            int64_t s0, int64_t s1, NK_A cm, NK_A ca,
                                                                            NK_A cb, const int act) {
#pragma omp simd
    for (int64_t s = s0; s < s1; s++) yc[s] = NK_STORE(NK_NAME(nk_act)((NK_LOAD(xc[s * C]) - cm) * ca + cb, act));
}

#define NK_BY_ACT(act, call_with)                                                                                \
    switch (act) {                                                                                             \
    case NK_ACT_SILU: call_with(NK_ACT_SILU); break;                                                           \
    case NK_ACT_RELU: call_with(NK_ACT_RELU); break;                                                           \
    case NK_ACT_HARDSWISH: call_with(NK_ACT_HARDSWISH); break;                                                 \
    default: call_with(NK_ACT_NONE); break;                                                                    \
    }

/* y = act((x - hi[n, c]) * scale[n, c] + shift[n, c]). hi is the mean rounded to NK_A, so x - hi is
 * exact near the mean and a large mean neither cancels nor shifts the output; what the rounding
 * lost (lo = mean - hi) is folded into the shift, shift = b - lo * scale; the constants are per
 * (n, c) with per_nc, else per channel. Input and output layouts may differ only as (channels-last
 * in, channels-first out), which InstanceNorm needs. */
static void NK_NAME(nk_apply)(const NK_T *x, NK_T *y, int64_t N, int64_t C, int64_t S, int in_nhwc, int out_nhwc,
                              int per_nc, const NK_A *hi, const NK_A *scale, const NK_A *shift, int act, int nt) {
    if (!in_nhwc) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = 0; c < C; c++) {
                int64_t nc = n * C + c, k = per_nc ? nc : c;
#define NK_CALL(A) NK_NAME(nk_apply_run)(x + nc * S, y + nc * S, S, hi[k], scale[k], shift[k], A)
                NK_BY_ACT(act, NK_CALL)
#undef NK_CALL
            }
    } else if (out_nhwc) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t ns = 0; ns < N * S; ns++) {
            int64_t o = per_nc ? (ns / S) * C : 0;
#define NK_CALL(A) NK_NAME(nk_apply_row)(x + ns * C, y + ns * C, C, hi + o, scale + o, shift + o, A)
            NK_BY_ACT(act, NK_CALL)
#undef NK_CALL
        }
    } else {
        /* channels-last in, channels-first out: a transpose, done in tiles of NK_TILE positions x
         * NK_TILE channels so that reads stay in L1 and every write is a contiguous run */
        int64_t tiles = (S + NK_TILE - 1) / NK_TILE;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t task = 0; task < N * tiles; task++) {
            int64_t n = task / tiles, s0 = (task % tiles) * NK_TILE;
            int64_t s1 = s0 + NK_TILE < S ? s0 + NK_TILE : S;
            for (int64_t c0 = 0; c0 < C; c0 += NK_TILE) {
                int64_t c1 = c0 + NK_TILE < C ? c0 + NK_TILE : C;
                for (int64_t c = c0; c < c1; c++) {
                    int64_t k = n * C + c, kp = per_nc ? k : c;
#define NK_CALL(A) \
    NK_NAME(nk_apply_strided)(x + (n * S) * C + c, y + k * S, C, s0, s1, hi[kp], scale[kp], shift[kp], A)
                    NK_BY_ACT(act, NK_CALL)
#undef NK_CALL
                }
            }
        }
    }
}

/* nk_apply's constants for channel c of a set with this mean and rstd: hi, the mean rounded to NK_A;
 * scale = rstd w; shift = b - lo scale, lo = mean - hi (computed in double, rounded once each). Every
 * forward order takes them from here, so that they give the same bits. */
static inline void NK_NAME(nk_consts)(double mean, double rstd, const NK_A *w, const NK_A *b, int64_t c, NK_A *hi,
                                      NK_A *scale, NK_A *shift) {
    double a = rstd * (w ? (double)w[c] : 1.0);
    *hi = (NK_A)mean;
    *scale = (NK_A)a;
    *shift = (NK_A)((b ? (double)b[c] : 0.0) - (mean - (double)*hi) * a);
}

/* Forward of BatchNorm (groups == 0: statistics per channel over N and S), GroupNorm and
 * InstanceNorm (groups > 0: per (n, group)), with optional SiLU (act == 1).
 * fixed_mean/fixed_var (per channel, groups == 0 only, in NK_A: the running statistics as they are
 * stored, read without a converted copy): normalize with these (eval) instead.
 * Writes the statistics used: mean_out (and the biased var_out) per set in double, rstd_out in NK_A
 * (what the backward reads: the forward's own arithmetic uses it in double). */
static void NK_NAME(nk_chan_fwd_all)(const NK_T *x, NK_T *y, int64_t N, int64_t C, int64_t S, int in_nhwc,
                                     int out_nhwc, int64_t groups, const NK_A *w, const NK_A *b,
                                     const NK_A *fixed_mean, const NK_A *fixed_var, double eps, int act,
                                     double *mean_out, NK_A *rstd_out, double *var_out, int nt) {
    int64_t sets = groups > 0 ? N * groups : C;
    if (fixed_mean) {
        for (int64_t c = 0; c < C; c++) mean_out[c] = (double)fixed_mean[c], var_out[c] = (double)fixed_var[c];
    } else if (groups > 0 && !in_nhwc) {
        /* channels-first GroupNorm/InstanceNorm with few sets a thread (nk_chan_fwd_sets otherwise) */
        int64_t len = (C / groups) * S;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t k = 0; k < sets; k++) {
            double m2;
            NK_NAME(nk_run_moments)(x + k * len, len, mean_out + k, &m2);
            var_out[k] = len > 0 ? m2 / (double)len : NAN;
        }
    } else {
        /* BatchNorm channels-last: the N*S rows are summed as one sample's, split among the threads
         * regardless of samples, so that no per-(n, c) moments are kept or merged */
        int64_t sn = groups == 0 && in_nhwc ? 1 : N, ss = sn == 1 ? N * S : S;
        double *mean_nc = (double *)malloc(sizeof(double) * (size_t)(sn * C + 1));
        double *m2_nc = (double *)malloc(sizeof(double) * (size_t)(sn * C + 1));
        NK_NAME(nk_nc_moments)(x, sn, C, ss, in_nhwc, mean_nc, m2_nc, nt);
        nk_sets_from_nc(mean_nc, m2_nc, sn, C, ss, groups, mean_out, var_out);
        free(mean_nc);
        free(m2_nc);
    }
    double *rstd = (double *)malloc(sizeof(double) * (size_t)(sets + 1));
    for (int64_t k = 0; k < sets; k++) {
        rstd[k] = 1.0 / sqrt(var_out[k] + eps);
        rstd_out[k] = (NK_A)rstd[k];
    }
    /* the affine constants per (n, c), or per channel for BatchNorm, whose sets are channels */
    int64_t P = groups > 0 ? N * C : C, D = groups > 0 ? C / groups : 1;
    NK_A *hi = (NK_A *)malloc(sizeof(NK_A) * (size_t)(P + 1));
    NK_A *scale = (NK_A *)malloc(sizeof(NK_A) * (size_t)(P + 1));
    NK_A *shift = (NK_A *)malloc(sizeof(NK_A) * (size_t)(P + 1));
    for (int64_t n = 0, i = 0; i < P; n++)
        for (int64_t c = 0, g = 0, d = 0; c < C; c++, i++) {
            int64_t k = groups > 0 ? n * groups + g : c;
            NK_NAME(nk_consts)(mean_out[k], rstd[k], w, b, c, hi + i, scale + i, shift + i);
            if (++d == D) d = 0, g++;
        }
    NK_NAME(nk_apply)(x, y, N, C, S, in_nhwc, out_nhwc, groups > 0, hi, scale, shift, act, nt);
    free(rstd);
    free(hi);
    free(scale);
    free(shift);
}

/* Channels-first GroupNorm/InstanceNorm, one set at a time: its statistics, then its output while the
 * set is still in L1/L2 (one read from memory instead of two). A set's C/groups channels are one
 * contiguous run, summed as such (per-channel runs and their merge cost more than the data when S is
 * small); the constants are nk_consts', as nk_chan_fwd_all's, so the output is the same to the bit. Threaded over the
 * sets: used when there are enough of them to keep every thread busy. */
static void NK_NAME(nk_chan_fwd_sets)(const NK_T *x, NK_T *y, int64_t N, int64_t C, int64_t S, int64_t groups,
                                      const NK_A *w, const NK_A *b, double eps, int act, double *mean_out,
                                      NK_A *rstd_out, double *var_out, int nt) {
    int64_t D = C / groups, len = D * S;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t k = 0; k < N * groups; k++) {
        double m2;
        NK_NAME(nk_run_moments)(x + k * len, len, mean_out + k, &m2);
        var_out[k] = len > 0 ? m2 / (double)len : NAN;
        double rstd = 1.0 / sqrt(var_out[k] + eps);
        rstd_out[k] = (NK_A)rstd;
        for (int64_t d = 0, c = (k % groups) * D; d < D; d++, c++) {
            NK_A hi, scale, shift;
            NK_NAME(nk_consts)(mean_out[k], rstd, w, b, c, &hi, &scale, &shift);
            const NK_T *xr = x + k * len + d * S;
            NK_T *yr = y + k * len + d * S;
#define NK_CALL(A) NK_NAME(nk_apply_run)(xr, yr, S, hi, scale, shift, A)
            NK_BY_ACT(act, NK_CALL)
#undef NK_CALL
        }
    }
}

/* Channels-first BatchNorm training, one channel at a time: the moments of its N runs, merged in sample
 * order with nk_sets_from_nc's arithmetic, then its N runs normalized while they are still in L1/L2.
 * The statistics are nk_chan_fwd_all's and the constants nk_consts', so the output is the same to the bit. */
static void NK_NAME(nk_chan_fwd_channels)(const NK_T *x, NK_T *y, int64_t N, int64_t C, int64_t S, const NK_A *w,
                                          const NK_A *b, double eps, int act, double *mean_out, NK_A *rstd_out,
                                          double *var_out, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double cnt = 0, m = 0, q = 0, nb = (double)S;
        for (int64_t n = 0; n < N; n++) {
            double bm, bq;
            NK_NAME(nk_run_moments)(x + (n * C + c) * S, S, &bm, &bq);
            double tot = cnt + nb, fa = nb / tot, fq = cnt * nb / tot, d = bm - m;
            m += d * fa;
            q += bq + d * d * fq;
            cnt = tot;
        }
        mean_out[c] = m;
        var_out[c] = cnt > 0 ? q / cnt : NAN;
        double rstd = 1.0 / sqrt(var_out[c] + eps);
        rstd_out[c] = (NK_A)rstd;
        NK_A hi, scale, shift;
        NK_NAME(nk_consts)(m, rstd, w, b, c, &hi, &scale, &shift);
        for (int64_t n = 0; n < N; n++) {
            const NK_T *xr = x + (n * C + c) * S;
            NK_T *yr = y + (n * C + c) * S;
#define NK_CALL(A) NK_NAME(nk_apply_run)(xr, yr, S, hi, scale, shift, A)
            NK_BY_ACT(act, NK_CALL)
#undef NK_CALL
        }
    }
}

static void NK_NAME(nk_chan_fwd_impl)(const NK_T *x, NK_T *y, int64_t N, int64_t C, int64_t S, int in_nhwc,
                                      int out_nhwc, int64_t groups, const NK_A *w, const NK_A *b,
                                      const NK_A *fixed_mean, const NK_A *fixed_var, double eps, int act,
                                      double *mean_out, NK_A *rstd_out, double *var_out, int nt) {
    nt = nk_threads(nt);
    if (!mean_out || !rstd_out || !var_out) {
        /* statistics the caller does not keep (all of them in inference; the mean and variance of a
         * norm without running statistics in training): the kernel still needs them */
        size_t sets = (size_t)(groups > 0 ? N * groups : C) + 1;
        double *tmp = (double *)malloc(2 * sets * sizeof(double));
        NK_A *tmp_rstd = (NK_A *)malloc(sets * sizeof(NK_A));
        NK_NAME(nk_chan_fwd_impl)(x, y, N, C, S, in_nhwc, out_nhwc, groups, w, b, fixed_mean, fixed_var, eps, act,
                                  mean_out ? mean_out : tmp, rstd_out ? rstd_out : tmp_rstd,
                                  var_out ? var_out : tmp + sets, nt);
        free(tmp);
        free(tmp_rstd);
        return;
    }
    if (groups > 0 && !in_nhwc && (N * groups >= NK_SETS_PER_THREAD * nt || nt == 1)) {
        NK_NAME(nk_chan_fwd_sets)(x, y, N, C, S, groups, w, b, eps, act, mean_out, rstd_out, var_out, nt);
        return;
    }
    /* not for 16-bit data, where this order measured 0.94-0.97x */
    if (groups == 0 && !in_nhwc && !fixed_mean && S > 0 && (C >= NK_SETS_PER_THREAD * nt || nt == 1) &&
        sizeof(NK_T) == sizeof(NK_A)) {
        NK_NAME(nk_chan_fwd_channels)(x, y, N, C, S, w, b, eps, act, mean_out, rstd_out, var_out, nt);
        return;
    }
    if (groups > 0 && N >= nt && nt > 1) {
        /* per-sample statistics: one thread takes a sample, its statistics and then its output
         * while the sample is still in cache (one read from memory instead of two) */
        int64_t sample = C * S;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t n = 0; n < N; n++)
            NK_NAME(nk_chan_fwd_all)(x + n * sample, y + n * sample, 1, C, S, in_nhwc, out_nhwc, groups, w, b, NULL,
                                     NULL, eps, act, mean_out + n * groups, rstd_out + n * groups,
                                     var_out + n * groups, 1);
        return;
    }
    NK_NAME(nk_chan_fwd_all)(x, y, N, C, S, in_nhwc, out_nhwc, groups, w, b, fixed_mean, fixed_var, eps, act,
                             mean_out, rstd_out, var_out, nt);
}

/* dz: the gradient reaching the normalized-affine value z = xhat * w + b (dy itself, or through SiLU) */
static inline __attribute__((always_inline)) NK_A NK_NAME(nk_dz)(NK_A dy, NK_A xhat, NK_A wc, NK_A bc,
                                                                 const int act) {
    if (!act) return dy;
    NK_A z = xhat * wc + bc;
    NK_A s = NK_NAME(nk_sigmoid)(z);
    return dy * s * ((NK_A)1 + z * ((NK_A)1 - s));
}

/* The loop bodies of nk_chan_bwd's two passes, inlined once with act = 0 and once with act = 1 so
 * that no simd loop carries a runtime branch (which would make the compiler emit scalar code). */

/* pass 1 over a channels-first run without an activation: sums of x - m, dy and dy (x - m), in vector
 * accumulators (one vector of x and dy at a time, loaded with NK_LOADV; the tail in scalars), each
 * block's sums added in double as nk_sums_run does */
static inline void NK_NAME(nk_sums_run_vec)(const NK_T *xr, const NK_T *dyr, int64_t S, NK_A m, double *t0,
                                            double *t1, double *t2) {
    double a0 = 0, a1 = 0, a2 = 0;
    NK_NAME(nk_vec) mm;
    for (int64_t l = 0; l < NK_LANES; l++) mm[l] = m;
    for (int64_t s0 = 0; s0 < S; s0 += NK_BLOCK) {
        int64_t s1 = s0 + NK_BLOCK < S ? s0 + NK_BLOCK : S, s = s0;
        NK_NAME(nk_vec) v0 = {0}, v1 = {0}, v2 = {0}, xv, dv;
        for (; s + NK_LANES <= s1; s += NK_LANES) {
            NK_LOADV(xv, xr + s);
            NK_LOADV(dv, dyr + s);
            xv -= mm;
            v0 += xv, v1 += dv, v2 += dv * xv;
        }
        NK_A u0 = NK_NAME(nk_hsum_tree)(v0), u1 = NK_NAME(nk_hsum_tree)(v1), u2 = NK_NAME(nk_hsum_tree)(v2);
        for (; s < s1; s++) {
            NK_A xc = NK_LOAD(xr[s]) - m, d = NK_LOAD(dyr[s]);
            u0 += xc, u1 += d, u2 += d * xc;
        }
        a0 += u0, a1 += u1, a2 += u2;
    }
    *t0 = a0, *t1 = a1, *t2 = a2;
}

/* pass 1 over a channels-first run: sums of x - m, dz and dz (x - m) */
static inline __attribute__((always_inline)) void NK_NAME(nk_sums_run)(const NK_T *xr, const NK_T *dyr, int64_t S,
                                                                       NK_A m, NK_A r, NK_A w, NK_A b, const int act,
                                                                       double *t0, double *t1, double *t2) {
    /* 16-bit data on long runs keeps the simd loop, whose conversions the compiler schedules better
     * (the vector path measured 0.90x there, 1.1x on runs of 49) */
    if (!act && (sizeof(NK_T) == sizeof(NK_A) || S <= NK_SHORT_RUN)) {
        NK_NAME(nk_sums_run_vec)(xr, dyr, S, m, t0, t1, t2);
        return;
    }
    double a0 = 0, a1 = 0, a2 = 0;
    for (int64_t s0 = 0; s0 < S; s0 += NK_BLOCK) {
        int64_t s1 = s0 + NK_BLOCK < S ? s0 + NK_BLOCK : S;
        NK_A u0 = 0, u1 = 0, u2 = 0;
#pragma omp simd reduction(+ : u0, u1, u2)
        for (int64_t s = s0; s < s1; s++) {
            NK_A xc = NK_LOAD(xr[s]) - m;
            NK_A dz = NK_NAME(nk_dz)(NK_LOAD(dyr[s]), xc * r, w, b, act);
            u0 += xc;
            u1 += dz;
            u2 += dz * xc;
        }
        a0 += u0, a1 += u1, a2 += u2;
    }
    *t0 = a0, *t1 = a1, *t2 = a2;
}

/* pass 1 over one channels-last row of C channels, into per-channel accumulators */
static inline __attribute__((always_inline)) void NK_NAME(nk_sums_row)(const NK_T *xr, const NK_T *dyr, int64_t C,
                                                                       const NK_A *m, const NK_A *r, const NK_A *w,
                                                                       const NK_A *b, const int act, NK_A *u0,
                                                                       NK_A *u1, NK_A *u2) {
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        NK_A xc = NK_LOAD(xr[c]) - m[c];
        NK_A dz = NK_NAME(nk_dz)(NK_LOAD(dyr[c]), xc * r[c], w[c], b[c], act);
        u0[c] += xc;
        u1[c] += dz;
        u2[c] += dz * xc;
    }
}

/* pass 2 with SiLU (without it, nk_dx_linear): dx = rstd * (w dz + k2 xhat + k3), over n contiguous
 * elements whose constants advance by `step` (0: one channels-first run; 1: one channels-last row),
 * dz = dy silu'(z). SiLU's derivative takes its
 * input from the centre zc that pass 1 used, so that each dz here is the dz pass 1 summed: dx is a
 * near-total cancellation of dz against its sums (for a group of two elements it is zero but for
 * eps), which a dz a rounding of the mean apart would turn into a 1% error. */
static inline __attribute__((always_inline)) void NK_NAME(nk_dx)(const NK_T *xr, const NK_T *dyr, NK_T *__restrict__ dxr,
                                                                 int64_t n, const int step, const NK_A *m,
                                                                 const NK_A *l, const NK_A *zc, const NK_A *r,
                                                                 const NK_A *w, const NK_A *b, const NK_A *k2,
                                                                 const NK_A *k3) {
    /* dxr restrict: no store to dx changes the constants, so a run's constants are loaded once, not
     * re-read for every vector of it (which the compiler must do if dx might alias them) */
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        int64_t c = step ? j : 0;
        NK_A xv = NK_LOAD(xr[j]);
        NK_A xhat = ((xv - m[c]) - l[c]) * r[c];
        NK_A dz = NK_NAME(nk_dz)(NK_LOAD(dyr[j]), (xv - zc[c]) * r[c], w[c], b[c], 1);
        dxr[j] = NK_STORE((dz * w[c] + xhat * k2[c] + k3[c]) * r[c]);
    }
}

/* pass 2 without an activation, as three per-slot constants: dx = a dy + b (x - m) + c, the same
 * expression multiplied out (a = rstd w; b = rstd^2 k2; c = rstd (k3 - l rstd k2), in double). x - m is
 * exact for x near the mean's high part m, so a large mean loses no bits; one subtraction and two
 * multiply-adds per element instead of seven operations. */
static inline __attribute__((always_inline)) void NK_NAME(nk_dx_linear)(const NK_T *xr, const NK_T *dyr,
                                                                        NK_T *__restrict__ dxr, int64_t n,
                                                                        const int step, const NK_A *m, const NK_A *a,
                                                                        const NK_A *b, const NK_A *c) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        int64_t k = step ? j : 0;
        dxr[j] = NK_STORE(a[k] * NK_LOAD(dyr[j]) + (b[k] * (NK_LOAD(xr[j]) - m[k]) + c[k]));
    }
}

/* The backward's shift for a set: the median of three of its elements (its first, middle and last), a
 * value inside the bulk of the data even when one of them is an outlier. The set is channels c0 ..
 * c0 + D - 1 of sample n (GroupNorm/InstanceNorm), or, whole_batch, channel c0 over every sample
 * (BatchNorm; D = 1). Once per set: three scattered loads each would cost more than a small set's sums. */
static inline NK_A NK_NAME(nk_set_shift)(const NK_T *x, int nhwc, int64_t N, int64_t C, int64_t S, int64_t n,
                                         int64_t c0, int64_t D, int whole_batch) {
    int64_t nn[3] = {n, whole_batch ? (N - 1) / 2 : n, whole_batch ? N - 1 : n};
    int64_t cc[3] = {c0, c0 + (D - 1) / 2, c0 + D - 1}, ss[3] = {0, (S - 1) / 2, S - 1};
    NK_A v[3];
    for (int t = 0; t < 3; t++) v[t] = NK_LOAD(x[nhwc ? (nn[t] * S + ss[t]) * C + cc[t] : (nn[t] * C + cc[t]) * S + ss[t]]);
    NK_A lo = v[0] < v[1] ? v[0] : v[1], hi = v[0] < v[1] ? v[1] : v[0];
    return v[2] < lo ? lo : (v[2] > hi ? hi : v[2]);
}

/* BatchNorm's backward with fixed statistics (eval: the running statistics), in one pass over x and
 * dy. dx = dy * (w * rstd) involves no statistic of the batch, so it is written from the same loads
 * that give the parameter gradients' sums, sum dy and sum dy (x - K): three streams of memory where
 * nk_chan_bwd's two passes take five. K is nk_set_shift's median of three, as in nk_chan_bwd, and the sums
 * are corrected to the fixed mean m as there: sum dy (x - m) = sum dy (x - K) - (m - K) sum dy. */
static void NK_NAME(nk_chan_bwd_fixed)(const NK_T *x, const NK_T *dy, NK_T *dx, int64_t N, int64_t C, int64_t S,
                                       int nhwc, const NK_A *w, const NK_A *mean, const NK_A *rstd, void *dw,
                                       void *db, int grads_float, int nt) {
    size_t pc = (size_t)C + 1;
    NK_A *shift = (NK_A *)malloc(sizeof(NK_A) * pc), *wr = (NK_A *)malloc(sizeof(NK_A) * pc);
    double *a1 = (double *)calloc(pc, sizeof(double)), *a2 = (double *)calloc(pc, sizeof(double));
    for (int64_t c = 0; c < C; c++) {
        shift[c] = NK_NAME(nk_set_shift)(x, nhwc, N, C, S, 0, c, 1, 1);
        wr[c] = (w ? w[c] : (NK_A)1) * rstd[c];
    }
    if (!nhwc) {
        /* a channel's N runs on one thread, in order */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t c = 0; c < C; c++) {
            double s1 = 0, s2 = 0;
            const NK_A k = shift[c], g = wr[c];
            for (int64_t n = 0; n < N; n++) {
                int64_t o = (n * C + c) * S;
                const NK_T *xr = x + o, *dyr = dy + o;
                NK_T *dxr = dx + o;
                for (int64_t s0 = 0; s0 < S; s0 += NK_BLOCK) {
                    int64_t s1e = s0 + NK_BLOCK < S ? s0 + NK_BLOCK : S;
                    NK_A u1 = 0, u2 = 0;
#pragma omp simd reduction(+ : u1, u2)
                    for (int64_t j = s0; j < s1e; j++) {
                        NK_A d = NK_LOAD(dyr[j]);
                        u1 += d;
                        u2 += d * (NK_LOAD(xr[j]) - k);
                        dxr[j] = NK_STORE(d * g);
                    }
                    s1 += u1, s2 += u2;
                }
            }
            a1[c] = s1, a2[c] = s2;
        }
    } else {
        /* blocks of the N*S rows, each with its own partial sums, added in block order afterwards */
        int64_t R = N * S, B = nk_row_blocks(1, R, nt), rows_per_block = (R + B - 1) / B, sub = nk_sub_rows(C);
        double *p1 = (double *)calloc((size_t)(B * C + 1), sizeof(double));
        double *p2 = (double *)calloc((size_t)(B * C + 1), sizeof(double));
#pragma omp parallel num_threads(nt)
        {
            NK_A *u1 = (NK_A *)malloc(sizeof(NK_A) * pc), *u2 = (NK_A *)malloc(sizeof(NK_A) * pc);
#pragma omp for schedule(static)
            for (int64_t bk = 0; bk < B; bk++) {
                int64_t r0 = bk * rows_per_block, r1 = r0 + rows_per_block < R ? r0 + rows_per_block : R;
                double *q1 = p1 + bk * C, *q2 = p2 + bk * C;
                for (int64_t s0 = r0; s0 < r1; s0 += sub) {
                    int64_t s1e = s0 + sub < r1 ? s0 + sub : r1;
                    for (int64_t c = 0; c < C; c++) u1[c] = 0, u2[c] = 0;
                    for (int64_t s = s0; s < s1e; s++) {
                        const NK_T *xr = x + s * C, *dyr = dy + s * C;
                        NK_T *dxr = dx + s * C;
#pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            NK_A d = NK_LOAD(dyr[c]);
                            u1[c] += d;
                            u2[c] += d * (NK_LOAD(xr[c]) - shift[c]);
                            dxr[c] = NK_STORE(d * wr[c]);
                        }
                    }
                    for (int64_t c = 0; c < C; c++) q1[c] += u1[c], q2[c] += u2[c];
                }
            }
            free(u1);
            free(u2);
        }
        for (int64_t bk = 0; bk < B; bk++)
            for (int64_t c = 0; c < C; c++) a1[c] += p1[bk * C + c], a2[c] += p2[bk * C + c];
        free(p1);
        free(p2);
    }
    for (int64_t c = 0; c < C; c++) {
        if (dw) nk_put_grad(dw, grads_float, c, (double)rstd[c] * (a2[c] - ((double)mean[c] - (double)shift[c]) * a1[c]));
        if (db) nk_put_grad(db, grads_float, c, a1[c]);
    }
    free(shift);
    free(wr);
    free(a1);
    free(a2);
}

/* What the steps of nk_chan_bwd share. A slot i is (n, c), i = n * C + c, for GroupNorm/InstanceNorm
 * and the channel for BatchNorm, whose sets are channels; a set's slots are contiguous (i = n * C + g *
 * D + d for set k = n * groups + g). Per slot: xhat = ((x - mh) - ml) * r and z = xhat * zw + zb; pass
 * 1's sums a0 = sum (x - shift), a1 = sum dz, a2 = sum dz (x - mh); pass 2's constants (k2, k3 and
 * pass 1's centre zc with SiLU, for nk_dx; la, lb, lc without, for nk_dx_linear). */
typedef struct {
    const NK_T *x, *dy;
    NK_T *dx;
    int64_t N, C, S, groups, D; /* D: channels a set */
    int per_nc, nhwc, train, act;
    const NK_A *w, *b, *mean, *rstd;
    double set_count, slot_count; /* elements in a set, and summed into a slot */
    NK_A *mh, *ml, *r, *zw, *zb, *zc, *k2, *k3, *la, *lb, *lc;
    double *a0, *a1, *a2;
} NK_NAME(nk_bwd);

/* Before pass 1, set k's shift (the saved mean for SiLU, whose derivative in pass 1 needs the input's
 * normalized value; else nk_set_shift's median of three) and its slots' constants */
static inline void NK_NAME(nk_bwd_begin)(const NK_NAME(nk_bwd) *st, int64_t k) {
    int64_t n = st->per_nc ? k / st->groups : 0, c0 = st->per_nc ? (k % st->groups) * st->D : k, i0 = n * st->C + c0;
    NK_A sh = st->act ? st->mean[k]
                      : NK_NAME(nk_set_shift)(st->x, st->nhwc, st->N, st->C, st->S, n, c0, st->D, !st->per_nc);
    for (int64_t d = 0; d < st->D; d++) {
        int64_t i = i0 + d, c = c0 + d;
        st->mh[i] = sh;
        st->r[i] = st->rstd[k];
        st->zw[i] = st->w ? st->w[c] : (NK_A)1;
        st->zb[i] = st->b ? st->b[c] : (NK_A)0;
    }
}

/* Pass 1 over slot i, channels-first: its run, or for BatchNorm its channel's run in every sample, in order.
 * Always inlined, as nk_bwd_dx_run: called as a function per slot, on runs of 49 it cost 5-10% (bfloat16) */
static inline __attribute__((always_inline)) void NK_NAME(nk_bwd_sums_run)(const NK_NAME(nk_bwd) *st, int64_t i) {
    const int64_t S = st->S, runs = st->per_nc ? 1 : st->N, run_step = st->per_nc ? 0 : st->C * S;
    double s0 = 0, s1 = 0, s2 = 0, t0, t1, t2;
    const NK_T *xr = st->x + i * S, *dyr = st->dy + i * S;
    for (int64_t n = 0; n < runs; n++, xr += run_step, dyr += run_step) {
        if (st->act)
            NK_NAME(nk_sums_run)(xr, dyr, S, st->mh[i], st->r[i], st->zw[i], st->zb[i], 1, &t0, &t1, &t2);
        else
            NK_NAME(nk_sums_run)(xr, dyr, S, st->mh[i], st->r[i], st->zw[i], st->zb[i], 0, &t0, &t1, &t2);
        s0 += t0, s1 += t1, s2 += t2;
    }
    st->a0[i] = s0, st->a1[i] = s1, st->a2[i] = s2;
}

/* Pass 1 channels-last: blocks of rows of a sample; BatchNorm's rows are all one set's, so its N*S rows
 * are split among the threads as if they were one sample's */
static void NK_NAME(nk_bwd_sums_rows)(const NK_NAME(nk_bwd) *st, int64_t NP, int nt) {
    const int64_t C = st->C, SR = st->per_nc ? st->S : st->N * st->S;
    int64_t B = nk_row_blocks(NP, SR, nt);
    int64_t rows_per_block = (SR + B - 1) / B;
    int64_t sub = nk_sub_rows(C);
    double *p0 = (double *)calloc((size_t)(NP * B * C + 1), sizeof(double));
    double *p1 = (double *)calloc((size_t)(NP * B * C + 1), sizeof(double));
    double *p2 = (double *)calloc((size_t)(NP * B * C + 1), sizeof(double));
#pragma omp parallel num_threads(nt)
    {
        NK_A *u0 = (NK_A *)malloc(sizeof(NK_A) * (size_t)C);
        NK_A *u1 = (NK_A *)malloc(sizeof(NK_A) * (size_t)C), *u2 = (NK_A *)malloc(sizeof(NK_A) * (size_t)C);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < NP * B; task++) {
            int64_t n = task / B, bk = task % B;
            int64_t r0 = bk * rows_per_block, r1 = r0 + rows_per_block < SR ? r0 + rows_per_block : SR;
            const NK_A *cm = st->mh + n * C, *cr = st->r + n * C, *cw = st->zw + n * C, *cb = st->zb + n * C;
            for (int64_t s0 = r0; s0 < r1; s0 += sub) {
                int64_t s1 = s0 + sub < r1 ? s0 + sub : r1;
                for (int64_t c = 0; c < C; c++) u0[c] = 0, u1[c] = 0, u2[c] = 0;
                for (int64_t s = s0; s < s1; s++) {
                    const NK_T *xr = st->x + (n * SR + s) * C, *dyr = st->dy + (n * SR + s) * C;
                    if (st->act)
                        NK_NAME(nk_sums_row)(xr, dyr, C, cm, cr, cw, cb, 1, u0, u1, u2);
                    else
                        NK_NAME(nk_sums_row)(xr, dyr, C, cm, cr, cw, cb, 0, u0, u1, u2);
                }
                double *q0 = p0 + task * C, *q1 = p1 + task * C, *q2 = p2 + task * C;
                for (int64_t c = 0; c < C; c++) q0[c] += u0[c], q1[c] += u1[c], q2[c] += u2[c];
            }
        }
        free(u0);
        free(u1);
        free(u2);
    }
    for (int64_t n = 0; n < NP; n++)
        for (int64_t bk = 0; bk < B; bk++)
            for (int64_t c = 0; c < C; c++) {
                int64_t t = (n * B + bk) * C + c;
                st->a0[n * C + c] += p0[t];
                st->a1[n * C + c] += p1[t];
                st->a2[n * C + c] += p2[t];
            }
    free(p0);
    free(p1);
    free(p2);
}

/* After pass 1, set k: its exact mean (train: statistics of x), which gives the low part of the centre;
 * a2 becomes sum dz * xhat; then the constants of dx = rstd * (w dz - mean_set(w dz) - xhat
 * mean_set(w dz xhat)): cancel first, then scale. Each sum over a set's slots runs in slot order. */
static inline void NK_NAME(nk_bwd_end)(const NK_NAME(nk_bwd) *st, int64_t k) {
    int64_t n = st->per_nc ? k / st->groups : 0, c0 = st->per_nc ? (k % st->groups) * st->D : k, i0 = n * st->C + c0;
    int64_t i1 = i0 + st->D;
    NK_A *mh = st->mh, *ml = st->ml, *r = st->r;
    double *a0 = st->a0, *a1 = st->a1, *a2 = st->a2;
    if (st->act) /* pass 1's centre, which SiLU's derivative keeps in pass 2 (mh becomes the exact mean) */
        for (int64_t i = i0; i < i1; i++) st->zc[i] = mh[i];
    double g1 = 0, g2 = 0;
    if (st->train) {
        double sx = 0;
        for (int64_t i = i0; i < i1; i++) sx += a0[i] + st->slot_count * (double)mh[i];
        double m = sx / st->set_count;
        for (int64_t i = i0; i < i1; i++) {
            a2[i] = (double)r[i] * (a2[i] - (m - (double)mh[i]) * a1[i]);
            mh[i] = (NK_A)m;
            ml[i] = (NK_A)(m - (double)mh[i]);
            double wc = st->w ? (double)st->w[c0 + i - i0] : 1.0;
            g1 += wc * a1[i];
            g2 += wc * a2[i];
        }
    } else if (!st->act) {
        /* eval: pass 1 was centred on a shift inside the data, not on the fixed mean (running
         * statistics may lie far from this batch), so sum dz (x - m) = sum dz (x - K) - (m - K) sum dz */
        for (int64_t i = i0; i < i1; i++) {
            a2[i] = (double)r[i] * (a2[i] - ((double)st->mean[k] - (double)mh[i]) * a1[i]);
            mh[i] = st->mean[k];
        }
    } else {
        for (int64_t i = i0; i < i1; i++) a2[i] *= (double)r[i];
    }
    double kk2 = -g2 / st->set_count, kk3 = -g1 / st->set_count;
    for (int64_t i = i0; i < i1; i++) {
        if (st->act) {
            st->k2[i] = (NK_A)kk2;
            st->k3[i] = (NK_A)kk3;
        } else {
            double ri = (double)r[i];
            st->la[i] = (NK_A)(ri * (double)st->zw[i]);
            st->lb[i] = (NK_A)(ri * ri * kk2);
            st->lc[i] = (NK_A)(ri * (kk3 - (double)ml[i] * ri * kk2));
        }
    }
}

/* Pass 2 over the channels-first run nc = n * C + c, whose constants are slot i's */
static inline __attribute__((always_inline)) void NK_NAME(nk_bwd_dx_run)(const NK_NAME(nk_bwd) *st, int64_t nc, int64_t i) {
    const int64_t S = st->S;
    const NK_T *xr = st->x + nc * S, *dyr = st->dy + nc * S;
    NK_T *dxr = st->dx + nc * S;
    if (st->act)
        NK_NAME(nk_dx)(xr, dyr, dxr, S, 0, st->mh + i, st->ml + i, st->zc + i, st->r + i, st->zw + i, st->zb + i,
                       st->k2 + i, st->k3 + i);
    else
        NK_NAME(nk_dx_linear)(xr, dyr, dxr, S, 0, st->mh + i, st->la + i, st->lb + i, st->lc + i);
}

/* Backward of nk_chan_fwd (same layout for x, dy and dx). train: the statistics came from x (they
 * are differentiated); otherwise they were constants (eval BatchNorm).
 *
 * The forward saves rstd per set in NK_A, and the mean only where the backward needs it (SiLU's
 * input, or eval's fixed statistics), in double as the forward returned it; it is used rounded to
 * NK_A. Pass 1
 * centres by a shift K inside the data (the saved mean for SiLU, else a median of three elements
 * of the set); with statistics of x it also sums x - K, which recovers the exact mean m, and with
 * either it corrects afterwards:
 *   sum dz (x - m) = sum dz (x - K) - (m - K) sum dz,
 * with no cancellation worth the name since |m - K| is of the order of the spread. (Only SiLU's
 * derivative inside pass 1 sees the float mean instead of the exact one.)
 * dw/db (may be NULL) get per-channel sums of dz * xhat and dz (double, or float with grads_float). */
static void NK_NAME(nk_chan_bwd_impl)(const NK_T *x, const NK_T *dy, NK_T *dx, int64_t N, int64_t C, int64_t S,
                                      int nhwc, int64_t groups, const NK_A *w, const NK_A *b, const double *mean_in,
                                      const NK_A *rstd, int train, int act, void *dw, void *db, int grads_float,
                                      int nt) {
    nt = nk_threads(nt);
    /* the mean arrives in double, as the forward returned it (the caller keeps no converted copy);
     * the passes use it rounded to NK_A, as a float32 copy would have held it */
    int64_t nsets = groups > 0 ? N * groups : C;
    NK_A *mean = mean_in ? (NK_A *)malloc(sizeof(NK_A) * (size_t)(nsets + 1)) : NULL;
    for (int64_t k = 0; mean && k < nsets; k++) mean[k] = (NK_A)mean_in[k];
    if (!train && !act && groups == 0 && (nhwc || C >= 2 * (int64_t)nt)) {
        /* fixed statistics (eval BatchNorm): one pass. Channels-first, it shares the channels among
         * the threads; with fewer than two a thread, the two-pass path's threading over (n, c) wins */
        NK_NAME(nk_chan_bwd_fixed)(x, dy, dx, N, C, S, nhwc, w, mean, rstd, dw, db, grads_float, nt);
        free(mean);
        return;
    }
    /* The constants and sums between the passes are kept per (n, c) for GroupNorm/InstanceNorm and
     * per channel for BatchNorm, whose sets are channels: BatchNorm's pass 1 sums each channel over
     * every sample directly, and nothing of size N*C is kept or reduced afterwards. */
    NK_NAME(nk_bwd) st = {.x = x, .dy = dy, .dx = dx, .N = N, .C = C, .S = S, .groups = groups, .per_nc = groups > 0,
                          .nhwc = nhwc, .train = train, .act = act, .w = w, .b = b, .mean = mean, .rstd = rstd};
    const int per_nc = st.per_nc;
    const int64_t NP = per_nc ? N : 1, P = NP * C; /* the (n, c) slots: i = n * C + c, n < NP */
    size_t pc = (size_t)(P + 1);
    int64_t sets = per_nc ? N * groups : C;
    /* the bookkeeping between the passes runs on every thread only when there are many slots (that
     * cut a GroupNorm backward at 8x1152x7x7 and 4x2048x5x5 by 13-18%): each parallel loop is a
     * synchronization, which costs a scheduler time slice whenever another process holds a core,
     * and a loop over a few thousand slots takes microseconds on one thread. Each sum over a set
     * adds its terms in the serial order either way, so results do not depend on it. */
    const int ntb = P >= NK_PAR_SLOTS ? nt : 1;
    st.D = per_nc ? C / groups : 1;
    st.set_count = per_nc ? (double)st.D * (double)S : (double)N * (double)S;
    st.slot_count = per_nc ? (double)S : (double)N * (double)S;
    st.mh = (NK_A *)malloc(sizeof(NK_A) * pc), st.ml = (NK_A *)calloc(pc, sizeof(NK_A));
    st.r = (NK_A *)malloc(sizeof(NK_A) * pc);
    st.zw = (NK_A *)malloc(sizeof(NK_A) * pc), st.zb = (NK_A *)malloc(sizeof(NK_A) * pc);
    st.a0 = (double *)calloc(pc, sizeof(double));
    st.a1 = (double *)calloc(pc, sizeof(double));
    st.a2 = (double *)calloc(pc, sizeof(double));
    /* pass 2's constants: k2, k3 and pass 1's centre zc for SiLU (nk_dx); without it, multiplied out
     * (nk_dx_linear) */
    if (act) {
        st.k2 = (NK_A *)malloc(sizeof(NK_A) * pc), st.k3 = (NK_A *)malloc(sizeof(NK_A) * pc);
        st.zc = (NK_A *)malloc(sizeof(NK_A) * pc);
    } else {
        st.la = (NK_A *)malloc(sizeof(NK_A) * pc), st.lb = (NK_A *)malloc(sizeof(NK_A) * pc);
        st.lc = (NK_A *)malloc(sizeof(NK_A) * pc);
    }
    /* the shifts first, in a loop of their own: three scattered loads a set, which overlap here but
     * would each stall a set's passes below */
#pragma omp parallel for num_threads(ntb) schedule(static)
    for (int64_t k = 0; k < sets; k++) NK_NAME(nk_bwd_begin)(&st, k);
    if (!nhwc && (sets >= NK_SETS_PER_THREAD * nt || nt == 1) && (sizeof(NK_T) == sizeof(NK_A) || S > NK_SHORT_RUN)) {
        /* channels-first with sets enough for every thread: each set's two passes back to back, the
         * second while the set is still in L1/L2 (the same arithmetic as the steps below, one set at a
         * time): a GroupNorm/InstanceNorm set's D runs, or a BatchNorm channel's N. Not for 16-bit data
         * on short runs, where it measured no faster (0.88-1.10x at 7x7 to 28x28, within the noise) */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t k = 0; k < sets; k++) {
            if (per_nc) {
                int64_t i0 = (k / groups) * C + (k % groups) * st.D;
                for (int64_t i = i0; i < i0 + st.D; i++) NK_NAME(nk_bwd_sums_run)(&st, i);
                NK_NAME(nk_bwd_end)(&st, k);
                for (int64_t i = i0; i < i0 + st.D; i++) NK_NAME(nk_bwd_dx_run)(&st, i, i);
            } else {
                NK_NAME(nk_bwd_sums_run)(&st, k);
                NK_NAME(nk_bwd_end)(&st, k);
                for (int64_t n = 0; n < N; n++) NK_NAME(nk_bwd_dx_run)(&st, n * C + k, k);
            }
        }
    } else {
        /* pass 1 */
        if (!nhwc) {
            /* per (n, c) run; BatchNorm adds a channel's runs over the samples in order on one thread */
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t i = 0; i < P; i++) NK_NAME(nk_bwd_sums_run)(&st, i);
        } else {
            NK_NAME(nk_bwd_sums_rows)(&st, NP, nt);
        }
#pragma omp parallel for num_threads(ntb) schedule(static)
        for (int64_t k = 0; k < sets; k++) NK_NAME(nk_bwd_end)(&st, k);
        /* pass 2 */
        if (!nhwc) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
            for (int64_t n = 0; n < N; n++)
                for (int64_t c = 0; c < C; c++) NK_NAME(nk_bwd_dx_run)(&st, n * C + c, per_nc ? n * C + c : c);
        } else {
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t ns = 0; ns < N * S; ns++) {
                int64_t o = per_nc ? (ns / S) * C : 0;
                const NK_T *xr = x + ns * C, *dyr = dy + ns * C;
                NK_T *dxr = dx + ns * C;
                if (act)
                    NK_NAME(nk_dx)(xr, dyr, dxr, C, 1, st.mh + o, st.ml + o, st.zc + o, st.r + o, st.zw + o,
                                   st.zb + o, st.k2 + o, st.k3 + o);
                else
                    NK_NAME(nk_dx_linear)(xr, dyr, dxr, C, 1, st.mh + o, st.la + o, st.lb + o, st.lc + o);
            }
        }
    }
    /* the parameter gradients: a channel's slots over the samples, in sample order. The samples are the
     * outer loop and a block of channels the inner one, so that the sums run along contiguous memory,
     * a vector of channels at a time (a loop over one channel's samples, C apart, was a chain of
     * dependent scalar adds: 13% of a GroupNorm backward at 32x512x7x7). The same adds, the same bits. */
#pragma omp parallel for num_threads(ntb) schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += NK_GRAD_COLS) {
        int64_t c1 = c0 + NK_GRAD_COLS < C ? c0 + NK_GRAD_COLS : C;
        double sw[NK_GRAD_COLS] = {0}, sb[NK_GRAD_COLS] = {0};
        for (int64_t n = 0; n < NP; n++) {
            const double *q2 = st.a2 + n * C, *q1 = st.a1 + n * C;
#pragma omp simd
            for (int64_t c = c0; c < c1; c++) sw[c - c0] += q2[c], sb[c - c0] += q1[c];
        }
        for (int64_t c = c0; c < c1; c++) {
            if (dw) nk_put_grad(dw, grads_float, c, sw[c - c0]);
            if (db) nk_put_grad(db, grads_float, c, sb[c - c0]);
        }
    }
    free(st.mh);
    free(st.ml);
    free(st.r);
    free(st.zw);
    free(st.zb);
    free(st.a0);
    free(st.a1);
    free(st.a2);
    free(st.k2);
    free(st.k3);
    free(st.la);
    free(st.lb);
    free(st.lc);
    free(st.zc);
    free(mean);
}

/* BatchNorm's running statistics, updated in place (either may be NULL) as torch ops would, in double:
 * run = run * (1 - momentum) + stat * momentum, with the variance made unbiased by var_factor first.
 * One call for what would be eight small torch ops. The volatile products keep the compiler from
 * fusing them into FMAs, which would round differently from the torch-op formula it replaces. */
static void NK_NAME(nk_running_update_impl)(NK_A *run_mean, NK_A *run_var, const double *mean, const double *var,
                                            int64_t C, double momentum, double var_factor) {
    for (int64_t c = 0; c < C; c++) {
        if (run_mean) {
            volatile double kept = (double)run_mean[c] * (1.0 - momentum), added = mean[c] * momentum;
            run_mean[c] = (NK_A)(kept + added);
        }
        if (run_var) {
            volatile double kept = (double)run_var[c] * (1.0 - momentum), added = var[c] * var_factor * momentum;
            run_var[c] = (NK_A)(kept + added);
        }
    }
}

/* the channels-first row norms (LayerNorm2d), with the same macros */
#include "channel_rows_impl.h"
#include "entry_points_impl.h"

#undef NK_T
#undef NK_A
#undef NK_LOAD
#undef NK_LOADV
#undef NK_STORE
#undef NK_NAME
#undef NK_EXP
#undef NK_RCP
#undef NK_LANES
#undef NK_BY_ACT
