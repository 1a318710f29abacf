/* The exported kernels. Each takes its arguments packed into 8-byte slots (nk_slot_i, nk_slot_d and
 * NK_SLOT_P in kernels.c; the order is kernels.py's _SIGNATURES) and its parameter vectors (weight,
 * bias; eval BatchNorm's running statistics) either in the arithmetic type NK_A or, with params_t, in the
 * data's own 16-bit type NK_T (a bfloat16 model's weights as they are stored), converted here into one
 * allocation. The caller would otherwise convert each with a torch op: a bfloat16 LayerNorm call of 1x4096
 * or 64x768 took 12-24 µs longer with bfloat16 parameters than with float32 ones, a call with float32 ones
 * 31-44 µs in all. Included by kernels_impl.h, once per data type. */

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

/* x, res, hout, w, b, y, rstd, M, N, eps, rms, rounding, gate, gate_act, gate_first, wgroups, params_t, threads */
void NK_NAME(nk_row_fwd)(const unsigned char *a) {
    const NK_A *w = NK_SLOT_P(a, 3), *b = NK_SLOT_P(a, 4);
    const NK_T *gate = NK_SLOT_P(a, 12);
    int64_t N = nk_slot_i(a, 8), wgroups = nk_slot_i(a, 15);
    NK_A *mem = NK_NAME(nk_params_in)((int)nk_slot_i(a, 16), gate ? wgroups * N : N, &w, &b, NULL, NULL);
    NK_NAME(nk_row_fwd_impl)(NK_SLOT_P(a, 0), NK_SLOT_P(a, 1), NK_SLOT_P(a, 2), w, b, NK_SLOT_P(a, 5),
                             NK_SLOT_P(a, 6), nk_slot_i(a, 7), N, nk_slot_d(a, 9), (int)nk_slot_i(a, 10),
                             (int)nk_slot_i(a, 11), gate, (int)nk_slot_i(a, 13), (int)nk_slot_i(a, 14), wgroups,
                             (int)nk_slot_i(a, 17));
    free(mem);
}

/* x, dy, dh, w, rstd, dx, dw, db, grads_float, M, N, rms, params_t, threads */
void NK_NAME(nk_row_bwd)(const unsigned char *a) {
    const NK_A *w = NK_SLOT_P(a, 3);
    int64_t N = nk_slot_i(a, 10);
    NK_A *mem = NK_NAME(nk_params_in)((int)nk_slot_i(a, 12), N, &w, NULL, NULL, NULL);
    NK_NAME(nk_row_bwd_impl)(NK_SLOT_P(a, 0), NK_SLOT_P(a, 1), NK_SLOT_P(a, 2), w, NK_SLOT_P(a, 4), NK_SLOT_P(a, 5),
                             NK_SLOT_P(a, 6), NK_SLOT_P(a, 7), (int)nk_slot_i(a, 8), nk_slot_i(a, 9), N,
                             (int)nk_slot_i(a, 11), (int)nk_slot_i(a, 13));
    free(mem);
}

/* x, y, N, C, S, in_nhwc, out_nhwc, groups, w, b, fixed_mean, fixed_var, eps, act, mean, rstd, var, params_t,
 * threads */
void NK_NAME(nk_chan_fwd)(const unsigned char *a) {
    const NK_A *w = NK_SLOT_P(a, 8), *b = NK_SLOT_P(a, 9), *fm = NK_SLOT_P(a, 10), *fv = NK_SLOT_P(a, 11);
    int64_t C = nk_slot_i(a, 3);
    NK_A *mem = NK_NAME(nk_params_in)((int)nk_slot_i(a, 17), C, &w, &b, &fm, &fv);
    NK_NAME(nk_chan_fwd_impl)(NK_SLOT_P(a, 0), NK_SLOT_P(a, 1), nk_slot_i(a, 2), C, nk_slot_i(a, 4),
                              (int)nk_slot_i(a, 5), (int)nk_slot_i(a, 6), nk_slot_i(a, 7), w, b, fm, fv,
                              nk_slot_d(a, 12), (int)nk_slot_i(a, 13), NK_SLOT_P(a, 14), NK_SLOT_P(a, 15),
                              NK_SLOT_P(a, 16), (int)nk_slot_i(a, 18));
    free(mem);
}

/* x, dy, dx, N, C, S, nhwc, groups, w, b, mean, rstd, train, act, dw, db, grads_float, params_t, threads */
void NK_NAME(nk_chan_bwd)(const unsigned char *a) {
    const NK_A *w = NK_SLOT_P(a, 8), *b = NK_SLOT_P(a, 9);
    int64_t C = nk_slot_i(a, 4);
    NK_A *mem = NK_NAME(nk_params_in)((int)nk_slot_i(a, 17), C, &w, &b, NULL, NULL);
    NK_NAME(nk_chan_bwd_impl)(NK_SLOT_P(a, 0), NK_SLOT_P(a, 1), NK_SLOT_P(a, 2), nk_slot_i(a, 3), C,
                              nk_slot_i(a, 5), (int)nk_slot_i(a, 6), nk_slot_i(a, 7), w, b, NK_SLOT_P(a, 10),
                              NK_SLOT_P(a, 11), (int)nk_slot_i(a, 12), (int)nk_slot_i(a, 13), NK_SLOT_P(a, 14),
                              NK_SLOT_P(a, 15), (int)nk_slot_i(a, 16), (int)nk_slot_i(a, 18));
    free(mem);
}

/* run_mean, run_var, mean, var, C, momentum, var_factor */
void NK_NAME(nk_running_update)(const unsigned char *a) {
    NK_NAME(nk_running_update_impl)(NK_SLOT_P(a, 0), NK_SLOT_P(a, 1), NK_SLOT_P(a, 2), NK_SLOT_P(a, 3),
                                    nk_slot_i(a, 4), nk_slot_d(a, 5), nk_slot_d(a, 6));
}

/* x, x_nhwc, w, b, y, y_nhwc, rstd, N, C, S, eps, rms, params_t, threads */
void NK_NAME(nk_cf_fwd)(const unsigned char *a) {
    const NK_A *w = NK_SLOT_P(a, 2), *b = NK_SLOT_P(a, 3);
    int64_t C = nk_slot_i(a, 8);
    NK_A *mem = NK_NAME(nk_params_in)((int)nk_slot_i(a, 12), C, &w, &b, NULL, NULL);
    NK_NAME(nk_cf_fwd_impl)(NK_SLOT_P(a, 0), (int)nk_slot_i(a, 1), w, b, NK_SLOT_P(a, 4), (int)nk_slot_i(a, 5),
                            NK_SLOT_P(a, 6), nk_slot_i(a, 7), C, nk_slot_i(a, 9), nk_slot_d(a, 10),
                            (int)nk_slot_i(a, 11), (int)nk_slot_i(a, 13));
    free(mem);
}

/* x, x_nhwc, dy, dy_nhwc, w, rstd, dx, dx_nhwc, dw, db, grads_float, N, C, S, rms, params_t, threads */
void NK_NAME(nk_cf_bwd)(const unsigned char *a) {
    const NK_A *w = NK_SLOT_P(a, 4);
    int64_t C = nk_slot_i(a, 12);
    NK_A *mem = NK_NAME(nk_params_in)((int)nk_slot_i(a, 15), C, &w, NULL, NULL, NULL);
    NK_NAME(nk_cf_bwd_impl)(NK_SLOT_P(a, 0), (int)nk_slot_i(a, 1), NK_SLOT_P(a, 2), (int)nk_slot_i(a, 3), w,
                            NK_SLOT_P(a, 5), NK_SLOT_P(a, 6), (int)nk_slot_i(a, 7), NK_SLOT_P(a, 8),
                            NK_SLOT_P(a, 9), (int)nk_slot_i(a, 10), nk_slot_i(a, 11), C, nk_slot_i(a, 13),
                            (int)nk_slot_i(a, 14), (int)nk_slot_i(a, 16));
    free(mem);
}
