/* The exported kernels: each takes its parameter vectors (weight, bias; eval BatchNorm's running
 * statistics) either in the arithmetic type NK_A or, with params_t, in the data's own 16-bit type NK_T
 * (a bfloat16 model's weights as they are stored), converted here into one allocation. The caller would
 * otherwise convert each with a torch op, which on a small norm cost more than the kernel: 12-22 µs a call
 * for a bfloat16 LayerNorm of 1x4096 or 64x768, against 3-6 µs for the kernel. Included by
 * kernels_impl.h, once per data type. */

/* Converts up to four vectors of n elements, stored as NK_T, into one NK_A allocation, pointing each
 * (non-NULL) *p at its copy; returns the allocation for the caller to free, NULL when nothing was
 * converted (params_t unset, or NK_T already NK_A). */
static NK_A *NK_NAME(nk_params_in)(int params_t, int64_t n, const NK_A **p0, const NK_A **p1, const NK_A **p2,
                                   const NK_A **p3) {
    if (!params_t || sizeof(NK_T) == sizeof(NK_A)) return NULL;
    const NK_A **ps[4] = {p0, p1, p2, p3};
    NK_A *mem = (NK_A *)malloc(sizeof(NK_A) * (size_t)(4 * n + 1)), *next = mem;
    for (int k = 0; k < 4; k++) {
        if (!ps[k] || !*ps[k]) continue;
        const NK_T *src = (const NK_T *)(const void *)*ps[k];
        for (int64_t j = 0; j < n; j++) next[j] = NK_LOAD(src[j]);
        *ps[k] = next;
        next += n;
    }
    return mem;
}

void NK_NAME(nk_row_fwd)(const NK_T *x, const NK_T *res, NK_T *hout, const NK_A *w, const NK_A *b, NK_T *y,
                         NK_A *rstd_out, int64_t M, int64_t N, double eps, int rms, int rounding, const NK_T *gate,
                         int gate_act, int gate_first, int64_t wgroups, int params_t, int nt) {
    NK_A *mem = NK_NAME(nk_params_in)(params_t, gate ? wgroups * N : N, &w, &b, NULL, NULL);
    NK_NAME(nk_row_fwd_impl)(x, res, hout, w, b, y, rstd_out, M, N, eps, rms, rounding, gate, gate_act, gate_first,
                             wgroups, nt);
    free(mem);
}

void NK_NAME(nk_row_bwd)(const NK_T *x, const NK_T *dy, const NK_T *dh, const NK_A *w, const NK_A *rstd_in,
                         NK_T *dx, void *dw, void *db, int grads_float, int64_t M, int64_t N, int rms, int params_t,
                         int nt) {
    NK_A *mem = NK_NAME(nk_params_in)(params_t, N, &w, NULL, NULL, NULL);
    NK_NAME(nk_row_bwd_impl)(x, dy, dh, w, rstd_in, dx, dw, db, grads_float, M, N, rms, nt);
    free(mem);
}

void NK_NAME(nk_chan_fwd)(const NK_T *x, NK_T *y, int64_t N, int64_t C, int64_t S, int in_nhwc, int out_nhwc,
                          int64_t groups, const NK_A *w, const NK_A *b, const NK_A *fixed_mean,
                          const NK_A *fixed_var, double eps, int act, double *mean_out, NK_A *rstd_out,
                          double *var_out, int params_t, int nt) {
    NK_A *mem = NK_NAME(nk_params_in)(params_t, C, &w, &b, &fixed_mean, &fixed_var);
    NK_NAME(nk_chan_fwd_impl)(x, y, N, C, S, in_nhwc, out_nhwc, groups, w, b, fixed_mean, fixed_var, eps, act,
                              mean_out, rstd_out, var_out, nt);
    free(mem);
}

void NK_NAME(nk_chan_bwd)(const NK_T *x, const NK_T *dy, NK_T *dx, int64_t N, int64_t C, int64_t S, int nhwc,
                          int64_t groups, const NK_A *w, const NK_A *b, const double *mean_in, const NK_A *rstd,
                          int train, int act, void *dw, void *db, int grads_float, int params_t, int nt) {
    NK_A *mem = NK_NAME(nk_params_in)(params_t, C, &w, &b, NULL, NULL);
    NK_NAME(nk_chan_bwd_impl)(x, dy, dx, N, C, S, nhwc, groups, w, b, mean_in, rstd, train, act, dw, db, grads_float,
                              nt);
    free(mem);
}

void NK_NAME(nk_cf_fwd)(const NK_T *x, int x_nhwc, const NK_A *w, const NK_A *b, NK_T *y, int y_nhwc, NK_A *rstd_out,
                        int64_t N, int64_t C, int64_t S, double eps, int rms, int params_t, int nt) {
    NK_A *mem = NK_NAME(nk_params_in)(params_t, C, &w, &b, NULL, NULL);
    NK_NAME(nk_cf_fwd_impl)(x, x_nhwc, w, b, y, y_nhwc, rstd_out, N, C, S, eps, rms, nt);
    free(mem);
}

void NK_NAME(nk_cf_bwd)(const NK_T *x, int x_nhwc, const NK_T *dy, int dy_nhwc, const NK_A *w, const NK_A *rstd_in,
                        NK_T *dx, int dx_nhwc, void *dw, void *db, int grads_float, int64_t N, int64_t C, int64_t S,
                        int rms, int params_t, int nt) {
    NK_A *mem = NK_NAME(nk_params_in)(params_t, C, &w, NULL, NULL, NULL);
    NK_NAME(nk_cf_bwd_impl)(x, x_nhwc, dy, dy_nhwc, w, rstd_in, dx, dx_nhwc, dw, db, grads_float, N, C, S, rms, nt);
    free(mem);
}
