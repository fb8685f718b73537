/* K planar layers, forward and backward, one row at a time: the CPU kernel behind
 * flowvae/flows/planar_kernel.py.
 *
 * The maths is that of planar_stack.py (and planar.py, which both are tested against):
 *   wu = wᵀu,  s = softplus(wu + shift) + slack = 1 + wᵀû,  c = (s - 1 - wu) / ‖w‖²,
 *   û = u + c w,  off = ‖w‖ b (scaled) or b,  a = wᵀz + off,  t = tanh(a),
 *   z' = z + t û,  log|det J| = log(t² + s (1 - t²)).
 * In eager PyTorch each layer costs a handful of tiny kernel launches; here a layer is two
 * dot-product-sized loops per row, so the cost is the arithmetic (B·K·D multiply-adds).
 *
 * Layouts (all contiguous, row-major): z (B, D); params (P, K, 2D + 1) holding [u, w, b] per
 * layer, P = B (amortised: row i uses params[i]) or P = 1 (global: every row uses params[0]).
 *
 * The body below is compiled twice, for float (suffix _f32) and double (_f64), by including
 * this file into itself with REAL and NAME defined.
 */
#ifndef REAL

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REAL float
#define NAME(x) x##_f32
#define REAL_TINY FLT_MIN
#define SQRT sqrtf
#define EXP expf
#define LOG logf
#define LOG1P log1pf
#define TANH tanhf
#include __FILE__
#undef REAL
#undef NAME
#undef REAL_TINY
#undef SQRT
#undef EXP
#undef LOG
#undef LOG1P
#undef TANH

#define REAL double
#define NAME(x) x##_f64
#define REAL_TINY DBL_MIN
#define SQRT sqrt
#define EXP exp
#define LOG log
#define LOG1P log1p
#define TANH tanh
#include __FILE__

/* Lets the loader check that it has this file's build and layout. */
int64_t planar_abi_version(void) { return 1; }

#else /* the body, once per REAL */

static inline REAL NAME(dot)(const REAL *a, const REAL *b, int64_t n) {
    REAL acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

/* torch.nn.functional.softplus with its default threshold of 20. */
static inline REAL NAME(softplus)(REAL x) { return x > 20 ? x : LOG1P(EXP(x)); }

/* Per layer (P·K of them): û, s, c, ‖w‖², wᵀu and the offset. */
void NAME(planar_prep)(int64_t P, int64_t K, int64_t D, const REAL *params, int scaled,
                       double slack, double shift, REAL *uhat, REAL *s, REAL *c, REAL *wsq,
                       REAL *wu, REAL *off) {
    const int64_t stride = 2 * D + 1;
    for (int64_t pk = 0; pk < P * K; ++pk) {
        const REAL *u = params + pk * stride, *w = u + D, b = u[2 * D];
        REAL x = NAME(dot)(w, u, D), n2 = NAME(dot)(w, w, D);
        if (n2 < REAL_TINY) n2 = REAL_TINY;
        REAL sk = NAME(softplus)(x + (REAL)shift) + (REAL)slack;
        REAL ck = (sk - (REAL)1 - x) / n2;
        REAL *uh = uhat + pk * D;
        for (int64_t i = 0; i < D; ++i) uh[i] = u[i] + ck * w[i];
        wu[pk] = x;
        wsq[pk] = n2;
        s[pk] = sk;
        c[pk] = ck;
        off[pk] = scaled ? SQRT(n2) * b : b;
    }
}

/* y = f_K ∘ … ∘ f_1 (z), ld = Σ_k log|det J_k|. When zs and t are given, each layer's input
 * (B, K, D) and tanh (B, K) are kept for the backward pass. */
void NAME(planar_forward)(int64_t B, int64_t P, int64_t K, int64_t D, const REAL *z0,
                          const REAL *params, const REAL *uhat, const REAL *s, const REAL *off,
                          REAL *y, REAL *ld, REAL *zs, REAL *t) {
    const int64_t stride = 2 * D + 1;
    for (int64_t r = 0; r < B; ++r) {
        const int64_t p = P == 1 ? 0 : r;
        REAL *z = y + r * D;
        memcpy(z, z0 + r * D, (size_t)D * sizeof(REAL));
        REAL total = 0;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t pk = p * K + k;
            const REAL *w = params + pk * stride + D, *uh = uhat + pk * D;
            if (zs) memcpy(zs + (r * K + k) * D, z, (size_t)D * sizeof(REAL));
            const REAL tk = TANH(NAME(dot)(w, z, D) + off[pk]);
            if (t) t[r * K + k] = tk;
            const REAL t2 = tk * tk;
            total += LOG(t2 + s[pk] * ((REAL)1 - t2));
            for (int64_t i = 0; i < D; ++i) z[i] += tk * uh[i];
        }
        ld[r] = total;
    }
}

/* Gradients of L(y, ld) given g_y = ∂L/∂y (B, D) and g_ld = ∂L/∂ld (B): g_z (B, D) and
 * g_params (P, K, 2D + 1). Returns 0, or -1 when out of memory. */
int NAME(planar_backward)(int64_t B, int64_t P, int64_t K, int64_t D, const REAL *g_y,
                          const REAL *g_ld, const REAL *zs, const REAL *t, const REAL *params,
                          const REAL *uhat, const REAL *s, const REAL *c, const REAL *wsq,
                          const REAL *wu, int scaled, double shift, REAL *g_z, REAL *g_params) {
    const int64_t stride = 2 * D + 1;
    /* ∂L/∂û, the direct part of ∂L/∂w, ∂L/∂off and ∂L/∂s per layer, summed over rows. */
    /* (calloc of 0 bytes may return NULL: ask for at least one element.) */
    REAL *g_uhat = calloc((size_t)(P * K * D) + 1, sizeof(REAL));
    REAL *g_wdir = calloc((size_t)(P * K * D) + 1, sizeof(REAL));
    REAL *g_off = calloc((size_t)(P * K) + 1, sizeof(REAL));
    REAL *g_s = calloc((size_t)(P * K) + 1, sizeof(REAL));
    if (!g_uhat || !g_wdir || !g_off || !g_s) {
        free(g_uhat), free(g_wdir), free(g_off), free(g_s);
        return -1;
    }
    for (int64_t r = 0; r < B; ++r) {
        const int64_t p = P == 1 ? 0 : r;
        REAL *g = g_z + r * D; /* ∂L/∂z after layer k, walked back to the input */
        memcpy(g, g_y + r * D, (size_t)D * sizeof(REAL));
        const REAL gl = g_ld[r];
        for (int64_t k = K - 1; k >= 0; --k) {
            const int64_t pk = p * K + k;
            const REAL *w = params + pk * stride + D, *uh = uhat + pk * D;
            const REAL *zk = zs + (r * K + k) * D;
            const REAL tk = t[r * K + k], t2 = tk * tk, h = (REAL)1 - t2;
            const REAL dn = t2 + s[pk] * h;
            const REAL gt = NAME(dot)(g, uh, D) + gl * (REAL)2 * tk * ((REAL)1 - s[pk]) / dn;
            const REAL ga = h * gt; /* ∂L/∂a_k */
            REAL *gu = g_uhat + pk * D, *gw = g_wdir + pk * D;
            for (int64_t i = 0; i < D; ++i) {
                gu[i] += tk * g[i];
                gw[i] += ga * zk[i];
                g[i] += ga * w[i];
            }
            g_off[pk] += ga;
            g_s[pk] += gl * h / dn;
        }
    }
    /* Through û = u + c w, c = (s - 1 - wᵀu)/‖w‖², s = softplus(wᵀu + shift) + slack and
     * off = ‖w‖ b to the packed [u, w, b]. */
    for (int64_t pk = 0; pk < P * K; ++pk) {
        const REAL *u = params + pk * stride, *w = u + D, b = u[2 * D];
        const REAL *gu = g_uhat + pk * D, *gw = g_wdir + pk * D;
        const REAL g_c_wsq = NAME(dot)(gu, w, D) / wsq[pk];
        const REAL sig = (REAL)1 / ((REAL)1 + EXP(-(wu[pk] + (REAL)shift)));
        const REAL g_wu = (g_s[pk] + g_c_wsq) * sig - g_c_wsq;
        REAL g_wsq = -g_c_wsq * c[pk], g_b = g_off[pk];
        if (scaled) {
            const REAL n = SQRT(wsq[pk]);
            g_b = g_off[pk] * n;
            g_wsq += g_off[pk] * b / ((REAL)2 * n);
        }
        /* Where ‖w‖² was clamped up to the smallest normal number the clamp passes no gradient. */
        if (NAME(dot)(w, w, D) < REAL_TINY) g_wsq = 0;
        REAL *out_u = g_params + pk * stride, *out_w = out_u + D;
        for (int64_t i = 0; i < D; ++i) {
            out_u[i] = gu[i] + g_wu * w[i];
            out_w[i] = gw[i] + c[pk] * gu[i] + g_wu * u[i] + (REAL)2 * g_wsq * w[i];
        }
        out_u[2 * D] = g_b;
    }
    free(g_uhat), free(g_wdir), free(g_off), free(g_s);
    return 0;
}

#endif
