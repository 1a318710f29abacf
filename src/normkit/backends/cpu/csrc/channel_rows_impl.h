/* LayerNorm and RMSNorm over the channels of a channels-first tensor, per position: timm's
 * LayerNorm2d and ConvNeXt's channels-first LayerNorm, without transposing the tensor.
 *
 * Included by kernels.c once per dtype, after kernels_impl.h (same macros). x is (N, C, S),
 * contiguous: each of the N*S "rows" to normalize is a column of C values S apart. A task takes a
 * tile of NK_CF_W positions of one sample (fewer at the end of a sample), copies the C x NK_CF_W tile
 * into a buffer in the arithmetic type (C streams of contiguous values: every cache line is used),
 * and works on it in cache with the positions as vector lanes, so every sum over the channels is a
 * per-lane sum in a fixed order (the same in the forward and the backward, whatever the vector
 * width). The tile width is a compile-time constant: with C short loops per pass, a run-time trip
 * count's loop overhead would cost more than the arithmetic; a short last tile is padded with zeros.
 *
 * Sums over the channels run in NK_A in chunks of NK_CF_CHUNK channels, each chunk added to a
 * double per position: float sums stay short, as in the row kernels' four vector accumulators. */

/* The C rows of a tile are C streams S apart, more than the hardware prefetchers follow: each
 * load and store of a tile row asks for the same row of the tile NK_CF_AHEAD tiles on (possibly
 * past the row's end, harmless for a prefetch), so memory latency overlaps the work on this one. */
static inline void NK_NAME(nk_cf_prefetch)(const NK_T *row, int write) {
    const char *p = (const char *)(row + NK_CF_AHEAD * NK_CF_W);
    for (size_t off = 0; off < NK_CF_W * sizeof(NK_T); off += 64) {
        if (write) __builtin_prefetch(p + off, 1, 3);
        else __builtin_prefetch(p + off, 0, 3);
    }
}

/* One channel's row of a channels-first tile -> buf (lanes from len on are zeros) */
static inline void NK_NAME(nk_cf_load_row)(const NK_T *src, int64_t len, NK_A *dst) {
    NK_NAME(nk_cf_prefetch)(src, 0);
    if (len == NK_CF_W) {
#pragma omp simd
        for (int64_t j = 0; j < NK_CF_W; j++) dst[j] = NK_LOAD(src[j]);
    } else {
        for (int64_t j = 0; j < NK_CF_W; j++) dst[j] = j < len ? NK_LOAD(src[j]) : (NK_A)0;
    }
}

/* The tile of positions s0 .. s0 + len of sample n of p -> buf (C x NK_CF_W, zeros past len).
 * p is (N, C, S) channels-first, or channels-last (N, S, C) when nhwc: then each position's C
 * values are contiguous and the tile is transposed on the way in. */
static inline void NK_NAME(nk_cf_load)(const NK_T *p, int nhwc, int64_t n, int64_t s0, int64_t len, int64_t C,
                                       int64_t S, NK_A *buf) {
    if (!nhwc) {
        for (int64_t c = 0; c < C; c++) NK_NAME(nk_cf_load_row)(p + (n * C + c) * S + s0, len, buf + c * NK_CF_W);
        return;
    }
    const NK_T *rows = p + (n * S + s0) * C;
    for (int64_t j = 0; j < NK_CF_W; j++) {
        if (j < len) {
            for (int64_t c = 0; c < C; c++) buf[c * NK_CF_W + j] = NK_LOAD(rows[j * C + c]);
        } else {
            for (int64_t c = 0; c < C; c++) buf[c * NK_CF_W + j] = 0;
        }
    }
}

/* buf (C x NK_CF_W) -> the tile's len positions of p, in either layout (as nk_cf_load) */
static inline void NK_NAME(nk_cf_store)(const NK_A *buf, int nhwc, int64_t n, int64_t s0, int64_t len, int64_t C,
                                        int64_t S, NK_T *p) {
    if (nhwc) {
        NK_T *rows = p + (n * S + s0) * C;
        for (int64_t j = 0; j < len; j++)
            for (int64_t c = 0; c < C; c++) rows[j * C + c] = NK_STORE(buf[c * NK_CF_W + j]);
        return;
    }
    for (int64_t c = 0; c < C; c++) {
        const NK_A *v = buf + c * NK_CF_W;
        NK_T *dst = p + (n * C + c) * S + s0;
        NK_NAME(nk_cf_prefetch)(dst, 1);
        if (len == NK_CF_W) {
#pragma omp simd
            for (int64_t j = 0; j < NK_CF_W; j++) dst[j] = NK_STORE(v[j]);
        } else {
            for (int64_t j = 0; j < len; j++) dst[j] = NK_STORE(v[j]);
        }
    }
}

/* s1[j], s2[j] = sums over the channels of d = buf[c][j] - k[j] and of d^2, in double */
static inline void NK_NAME(nk_cf_sums)(const NK_A *buf, int64_t C, const NK_A *k, double *s1, double *s2) {
    NK_A p1[NK_CF_W], p2[NK_CF_W];
    for (int64_t j = 0; j < NK_CF_W; j++) s1[j] = 0, s2[j] = 0;
    for (int64_t c0 = 0; c0 < C; c0 += NK_CF_CHUNK) {
        int64_t c1 = c0 + NK_CF_CHUNK < C ? c0 + NK_CF_CHUNK : C;
        for (int64_t j = 0; j < NK_CF_W; j++) p1[j] = 0, p2[j] = 0;
        for (int64_t c = c0; c < c1; c++) {
            const NK_A *r = buf + c * NK_CF_W;
#pragma omp simd
            for (int64_t j = 0; j < NK_CF_W; j++) {
                NK_A d = r[j] - k[j];
                p1[j] += d;
                p2[j] += d * d;
            }
        }
#pragma omp simd
        for (int64_t j = 0; j < NK_CF_W; j++) s1[j] += (double)p1[j], s2[j] += (double)p2[j];
    }
}

/* Each position's statistics: the mean as hi + lo (float and remainder; 0 for RMSNorm) and rstd.
 * LayerNorm takes sums of d = x - k about the first channel's value k (one read of the tile), so
 * var = mean(d^2) - e^2 with e = mean(d) loses about (1 + e^2 / var) ulps: where the first value lies
 * far out (e^2 > 8 var at any position of the tile) the sums are taken once more about the mean just
 * found. The forward and the backward both call this, so they agree bit for bit. */
static inline void NK_NAME(nk_cf_stats)(const NK_A *buf, int64_t C, int rms, double eps, NK_A *hi, NK_A *lo,
                                        NK_A *rstd) {
    double s1[NK_CF_W], s2[NK_CF_W], var[NK_CF_W];
    for (int64_t j = 0; j < NK_CF_W; j++) hi[j] = rms ? (NK_A)0 : buf[j], lo[j] = 0;
    for (int pass = 0;; pass++) {
        NK_NAME(nk_cf_sums)(buf, C, hi, s1, s2);
        int far = 0;
        for (int64_t j = 0; j < NK_CF_W; j++) {
            double e = rms ? 0.0 : s1[j] / (double)C, q = s2[j] / (double)C;
            var[j] = q - e * e; /* for RMSNorm, the mean square */
            far |= e * e > 8.0 * var[j];
            double mean = (double)hi[j] + e;
            hi[j] = (NK_A)mean;
            lo[j] = (NK_A)(mean - (double)hi[j]);
        }
        if (!far || pass == 1) break;
    }
    for (int64_t j = 0; j < NK_CF_W; j++) rstd[j] = (NK_A)(1.0 / sqrt((var[j] > 0 ? var[j] : 0.0) + eps));
}

/* y = LayerNorm/RMSNorm of x over the channels at each position; x and y each channels-first or
 * channels-last (x_nhwc, y_nhwc); rstd_out gets one value per (n, position). */
static void NK_NAME(nk_cf_fwd_impl)(const NK_T *x, int x_nhwc, const NK_A *w, const NK_A *b, NK_T *y, int y_nhwc,
                                    NK_A *rstd_out, int64_t N, int64_t C, int64_t S, double eps, int rms, int nt) {
    int64_t tiles = (S + NK_CF_W - 1) / NK_CF_W;
#pragma omp parallel num_threads(nk_threads(nt))
    {
        NK_A *buf = (NK_A *)malloc(sizeof(NK_A) * (size_t)(C * NK_CF_W));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * tiles; task++) {
            int64_t n = task / tiles, s0 = (task % tiles) * NK_CF_W;
            int64_t len = S - s0 < NK_CF_W ? S - s0 : NK_CF_W;
            NK_A hi[NK_CF_W], lo[NK_CF_W], rstd[NK_CF_W];
            NK_NAME(nk_cf_load)(x, x_nhwc, n, s0, len, C, S, buf);
            NK_NAME(nk_cf_stats)(buf, C, rms, eps, hi, lo, rstd);
            if (rstd_out)
                for (int64_t j = 0; j < len; j++) rstd_out[n * S + s0 + j] = rstd[j];
            for (int64_t c = 0; c < C; c++) {
                NK_A *r = buf + c * NK_CF_W;
                NK_A wc = w ? w[c] : (NK_A)1, bc = b ? b[c] : (NK_A)0;
#pragma omp simd
                for (int64_t j = 0; j < NK_CF_W; j++) r[j] = ((r[j] - hi[j]) - lo[j]) * rstd[j] * wc + bc;
            }
            NK_NAME(nk_cf_store)(buf, y_nhwc, n, s0, len, C, S, y);
        }
        free(buf);
    }
}

/* Backward of nk_cf_fwd: per position, dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)) with
 * g = dy w (RMSNorm: no mean_c(g)); the mean is recomputed from x exactly as the forward found it.
 * dw[c] and db[c] (may be NULL; double, or float with grads_float) get the sums over n and positions of
 * dy xhat and dy. Each
 * of x, dy and dx is channels-first or channels-last (its *_nhwc flag). */
static void NK_NAME(nk_cf_bwd_impl)(const NK_T *x, int x_nhwc, const NK_T *dy, int dy_nhwc, const NK_A *w,
                                    const NK_A *rstd_in, NK_T *dx, int dx_nhwc, void *dw, void *db, int grads_float,
                                    int64_t N, int64_t C, int64_t S, int rms, int nt) {
    nt = nk_threads(nt);
    int64_t tiles = (S + NK_CF_W - 1) / NK_CF_W;
    double *part_w = (double *)calloc((size_t)nt * (size_t)C + 1, sizeof(double));
    double *part_b = (double *)calloc((size_t)nt * (size_t)C + 1, sizeof(double));
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        NK_A *xh = (NK_A *)malloc(sizeof(NK_A) * (size_t)(2 * C * NK_CF_W));
        NK_A *g = xh + C * NK_CF_W;
        double *pw = part_w + tid * C, *pb = part_b + tid * C;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * tiles; task++) {
            int64_t n = task / tiles, s0 = (task % tiles) * NK_CF_W;
            int64_t len = S - s0 < NK_CF_W ? S - s0 : NK_CF_W;
            NK_A hi[NK_CF_W], lo[NK_CF_W], rstd[NK_CF_W], p1[NK_CF_W], p2[NK_CF_W], m1[NK_CF_W], m2[NK_CF_W];
            double c1[NK_CF_W], c2[NK_CF_W];
            NK_NAME(nk_cf_load)(x, x_nhwc, n, s0, len, C, S, xh);
            NK_NAME(nk_cf_load)(dy, dy_nhwc, n, s0, len, C, S, g); /* zeros past len: no part in any sum */
            NK_NAME(nk_cf_stats)(xh, C, rms, 0.0, hi, lo, rstd); /* the mean; rstd is the saved one */
            for (int64_t j = 0; j < NK_CF_W; j++) rstd[j] = j < len ? rstd_in[n * S + s0 + j] : (NK_A)0;
            for (int64_t j = 0; j < NK_CF_W; j++) c1[j] = 0, c2[j] = 0;
            /* xh <- xhat, g <- dy w; per-channel sums of dy xhat and dy; per-position sums of g and g xhat */
            for (int64_t c0 = 0; c0 < C; c0 += NK_CF_CHUNK) {
                int64_t c1e = c0 + NK_CF_CHUNK < C ? c0 + NK_CF_CHUNK : C;
                for (int64_t j = 0; j < NK_CF_W; j++) p1[j] = 0, p2[j] = 0;
                for (int64_t c = c0; c < c1e; c++) {
                    NK_A *r = xh + c * NK_CF_W, *gr = g + c * NK_CF_W;
                    NK_A wc = w ? w[c] : (NK_A)1, sw = 0, sb = 0;
#pragma omp simd reduction(+ : sw, sb)
                    for (int64_t j = 0; j < NK_CF_W; j++) {
                        NK_A d = gr[j], xhat = ((r[j] - hi[j]) - lo[j]) * rstd[j], gg = d * wc;
                        r[j] = xhat;
                        gr[j] = gg;
                        p1[j] += gg;
                        p2[j] += gg * xhat;
                        sw += d * xhat;
                        sb += d;
                    }
                    pw[c] += (double)sw;
                    pb[c] += (double)sb;
                }
#pragma omp simd
                for (int64_t j = 0; j < NK_CF_W; j++) c1[j] += (double)p1[j], c2[j] += (double)p2[j];
            }
            for (int64_t j = 0; j < NK_CF_W; j++) {
                m1[j] = rms ? (NK_A)0 : (NK_A)(c1[j] / (double)C);
                m2[j] = (NK_A)(c2[j] / (double)C);
            }
            for (int64_t c = 0; c < C; c++) {
                const NK_A *r = xh + c * NK_CF_W;
                NK_A *gr = g + c * NK_CF_W;
#pragma omp simd
                for (int64_t j = 0; j < NK_CF_W; j++) gr[j] = rstd[j] * (gr[j] - m1[j] - r[j] * m2[j]);
            }
            NK_NAME(nk_cf_store)(g, dx_nhwc, n, s0, len, C, S, dx);
        }
        free(xh);
    }
    nk_sum_thread_partials(part_w, part_b, nt, C, dw, db, grads_float);
    free(part_w);
    free(part_b);
}
