/*
 * CPU kernels for the linear recurrence h_t = lam_t * h_{t-1} + x_t over complex tensors.
 *
 * A call walks one stretch of time [t0, t1) for a rectangle of batch rows [b0, b1) and
 * channels [n0, n1), reading x and writing h once, so a scan moves the bytes of a copy.
 * Python splits the work over threads (the GIL is released while a kernel runs): across rows
 * when there are enough of them, otherwise across time, where each stretch is scanned from a
 * zero state and a fix-up pass adds the carried-in state times the decay products.
 *
 * Complex numbers are interleaved (re, im), as torch stores complex64/complex128. lam is (N,)
 * time-invariant or (B, T, N) time-varying; every array is contiguous. Pointers arrive as
 * integers (tensor.data_ptr()); 0 means absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

/* Channels handled together; their running values live in stack arrays of this size. */
#define BLOCK 256

/* A fix-up multiplies a carried-in state by the decays step after step, so it shrinks towards
 * zero and, a few hundred steps in, into subnormal numbers, where every multiply costs about a
 * hundred times more: with two threads the fix-up took five times a whole one-thread scan.
 * Values below the smallest normal number are flushed to zero (what FTZ mode does), and once a
 * block's carried-in state is all zero the fix-up stops: adding zero changes nothing. */
#define FLUSH_c64(v) (fabsf(v) < FLT_MIN ? 0.0f : (v))
#define FLUSH_c128(v) (fabs(v) < DBL_MIN ? 0.0 : (v))

#define DEFINE_KERNELS(SUFFIX, REAL)                                                              \
/* h_t = lam_t h_{t-1} + x_t for t in [t0, t1), starting from h0 (or zero). */                   \
static void forward_##SUFFIX(const REAL *restrict lam, int tv, const REAL *restrict x,           \
                             REAL *restrict h, const REAL *restrict h0, int64_t T, int64_t N,    \
                             int64_t b, int64_t n0, int64_t n1, int64_t t0, int64_t t1) {        \
    REAL cr[BLOCK], ci[BLOCK];                                                                    \
    const int64_t w = n1 - n0;                                                                    \
    for (int64_t k = 0; k < w; ++k) {                                                             \
        cr[k] = h0 ? h0[2 * (b * N + n0 + k)] : (REAL)0;                                          \
        ci[k] = h0 ? h0[2 * (b * N + n0 + k) + 1] : (REAL)0;                                      \
    }                                                                                             \
    for (int64_t t = t0; t < t1; ++t) {                                                           \
        const int64_t row = 2 * ((b * T + t) * N + n0);                                           \
        const REAL *xs = x + row;                                                                 \
        const REAL *ls = tv ? lam + row : lam + 2 * n0;                                           \
        REAL *hs = h + row;                                                                       \
        for (int64_t k = 0; k < w; ++k) {                                                         \
            const REAL lr = ls[2 * k], li = ls[2 * k + 1], pr = cr[k], pi = ci[k];                \
            cr[k] = lr * pr - li * pi + xs[2 * k];                                                \
            ci[k] = lr * pi + li * pr + xs[2 * k + 1];                                            \
            hs[2 * k] = cr[k];                                                                    \
            hs[2 * k + 1] = ci[k];                                                                \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* h_t += (lam_{t0} ... lam_t) carry for t in [t0, t1): the state entering the stretch. */       \
static void fixup_forward_##SUFFIX(const REAL *restrict lam, int tv, REAL *restrict h,           \
                                   const REAL *restrict carry, int64_t T, int64_t N, int64_t b,  \
                                   int64_t n0, int64_t n1, int64_t t0, int64_t t1) {             \
    REAL vr[BLOCK], vi[BLOCK];                                                                    \
    const int64_t w = n1 - n0;                                                                    \
    for (int64_t k = 0; k < w; ++k) {                                                             \
        vr[k] = carry[2 * (b * N + n0 + k)];                                                      \
        vi[k] = carry[2 * (b * N + n0 + k) + 1];                                                  \
    }                                                                                             \
    for (int64_t t = t0; t < t1; ++t) {                                                           \
        const int64_t row = 2 * ((b * T + t) * N + n0);                                           \
        const REAL *ls = tv ? lam + row : lam + 2 * n0;                                           \
        REAL *hs = h + row;                                                                       \
        int alive = 0;                                                                            \
        for (int64_t k = 0; k < w; ++k) {                                                         \
            const REAL lr = ls[2 * k], li = ls[2 * k + 1], pr = vr[k], pi = vi[k];                \
            vr[k] = FLUSH_##SUFFIX(lr * pr - li * pi);                                            \
            vi[k] = FLUSH_##SUFFIX(lr * pi + li * pr);                                            \
            hs[2 * k] += vr[k];                                                                   \
            hs[2 * k + 1] += vi[k];                                                               \
            alive |= (vr[k] != (REAL)0) | (vi[k] != (REAL)0);                                     \
        }                                                                                         \
        if (!alive) break; /* the carried-in state has decayed to nothing: the rest is exact */   \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* a_t conj(h_{t-1}): stored (add = 0) or added (add = 1) per step into gl when lam is           \
 * time-varying, else summed into acc. */                                                        \
static inline void grad_lam_step_##SUFFIX(const REAL *ar, const REAL *ai, const REAL *hp,        \
                                          REAL *gl, int add, double *acc_r, double *acc_i,       \
                                          int64_t w) {                                           \
    for (int64_t k = 0; k < w; ++k) {                                                             \
        const REAL hr = hp ? hp[2 * k] : (REAL)0, hi = hp ? -hp[2 * k + 1] : (REAL)0;             \
        const REAL re = ar[k] * hr - ai[k] * hi, im = ar[k] * hi + ai[k] * hr;                    \
        if (gl) {                                                                                 \
            gl[2 * k] = add ? gl[2 * k] + re : re;                                                \
            gl[2 * k + 1] = add ? gl[2 * k + 1] + im : im;                                        \
        } else {                                                                                  \
            acc_r[k] += re;                                                                       \
            acc_i[k] += im;                                                                       \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* Adjoint over [t0, t1): a_t = g_t + conj(lam_{t+1}) a_{t+1}, starting from g_last (the         \
 * gradient of the last state) or zero. Writes grad_x = a and, when grad_lam is given,         \
 * a_t conj(h_{t-1}): per step (time-varying) or summed over the stretch into grad_lam[b]        \
 * (time-invariant, one (B, N) buffer per stretch). */                                           \
static void backward_##SUFFIX(const REAL *restrict lam, int tv, const REAL *restrict g,          \
                              const REAL *restrict g_last, const REAL *restrict h,               \
                              const REAL *restrict h0, REAL *restrict grad_x,                    \
                              REAL *restrict grad_lam, int64_t T, int64_t N, int64_t b,          \
                              int64_t n0, int64_t n1, int64_t t0, int64_t t1) {                  \
    REAL ar[BLOCK], ai[BLOCK];                                                                    \
    double acc_r[BLOCK], acc_i[BLOCK];                                                            \
    const int64_t w = n1 - n0;                                                                    \
    for (int64_t k = 0; k < w; ++k) {                                                             \
        ar[k] = g_last ? g_last[2 * (b * N + n0 + k)] : (REAL)0;                                  \
        ai[k] = g_last ? g_last[2 * (b * N + n0 + k) + 1] : (REAL)0;                              \
        acc_r[k] = acc_i[k] = 0.0;                                                                \
    }                                                                                             \
    for (int64_t t = t1 - 1; t >= t0; --t) {                                                      \
        const int64_t row = 2 * ((b * T + t) * N + n0);                                           \
        const REAL *gs = g + row;                                                                 \
        REAL *as = grad_x + row;                                                                  \
        if (t < t1 - 1) {                                                                         \
            const REAL *ls = tv ? lam + row + 2 * N : lam + 2 * n0;                               \
            for (int64_t k = 0; k < w; ++k) {                                                     \
                const REAL lr = ls[2 * k], li = -ls[2 * k + 1], pr = ar[k], pi = ai[k];           \
                ar[k] = lr * pr - li * pi;                                                        \
                ai[k] = lr * pi + li * pr;                                                        \
            }                                                                                     \
        }                                                                                         \
        for (int64_t k = 0; k < w; ++k) {                                                         \
            ar[k] += gs[2 * k];                                                                   \
            ai[k] += gs[2 * k + 1];                                                               \
            as[2 * k] = ar[k];                                                                    \
            as[2 * k + 1] = ai[k];                                                                \
        }                                                                                         \
        if (grad_lam) {                                                                           \
            const REAL *hp = t > 0 ? h + row - 2 * N : (h0 ? h0 + 2 * (b * N + n0) : NULL);       \
            grad_lam_step_##SUFFIX(ar, ai, hp, tv ? grad_lam + row : NULL, 0, acc_r, acc_i, w);      \
        }                                                                                         \
    }                                                                                             \
    if (grad_lam && !tv) {                                                                        \
        REAL *gl = grad_lam + 2 * (b * N + n0);                                                   \
        for (int64_t k = 0; k < w; ++k) {                                                         \
            gl[2 * k] = (REAL)acc_r[k];                                                           \
            gl[2 * k + 1] = (REAL)acc_i[k];                                                       \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* Adds the adjoint carried in from after the stretch: a_t += (conj(lam_{t+1}) ... conj(lam_t1))  \
 * carry for t in [t0, t1), with its share of grad_lam (added to what backward wrote). */        \
static void fixup_backward_##SUFFIX(const REAL *restrict lam, int tv, REAL *restrict grad_x,     \
                                    const REAL *restrict carry, const REAL *restrict h,          \
                                    const REAL *restrict h0, REAL *restrict grad_lam,            \
                                    int64_t T, int64_t N, int64_t b, int64_t n0, int64_t n1,     \
                                    int64_t t0, int64_t t1) {                                    \
    REAL vr[BLOCK], vi[BLOCK];                                                                    \
    double acc_r[BLOCK], acc_i[BLOCK];                                                            \
    const int64_t w = n1 - n0;                                                                    \
    for (int64_t k = 0; k < w; ++k) {                                                             \
        vr[k] = carry[2 * (b * N + n0 + k)];                                                      \
        vi[k] = carry[2 * (b * N + n0 + k) + 1];                                                  \
        acc_r[k] = acc_i[k] = 0.0;                                                                \
    }                                                                                             \
    for (int64_t t = t1 - 1; t >= t0; --t) {                                                      \
        const int64_t row = 2 * ((b * T + t) * N + n0);                                           \
        const REAL *ls = tv ? lam + row + 2 * N : lam + 2 * n0;                                   \
        REAL *as = grad_x + row;                                                                  \
        int alive = 0;                                                                            \
        for (int64_t k = 0; k < w; ++k) {                                                         \
            const REAL lr = ls[2 * k], li = -ls[2 * k + 1], pr = vr[k], pi = vi[k];               \
            vr[k] = FLUSH_##SUFFIX(lr * pr - li * pi);                                            \
            vi[k] = FLUSH_##SUFFIX(lr * pi + li * pr);                                            \
            as[2 * k] += vr[k];                                                                   \
            as[2 * k + 1] += vi[k];                                                               \
            alive |= (vr[k] != (REAL)0) | (vi[k] != (REAL)0);                                     \
        }                                                                                         \
        if (grad_lam) {                                                                           \
            const REAL *hp = t > 0 ? h + row - 2 * N : (h0 ? h0 + 2 * (b * N + n0) : NULL);       \
            grad_lam_step_##SUFFIX(vr, vi, hp, tv ? grad_lam + row : NULL, 1, acc_r, acc_i, w);      \
        }                                                                                         \
        if (!alive) break; /* nothing left to add, here or earlier in the stretch */             \
    }                                                                                             \
    if (grad_lam && !tv) {                                                                        \
        REAL *gl = grad_lam + 2 * (b * N + n0);                                                   \
        for (int64_t k = 0; k < w; ++k) {                                                         \
            gl[2 * k] += (REAL)acc_r[k];                                                          \
            gl[2 * k + 1] += (REAL)acc_i[k];                                                      \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_KERNELS(c64, float)
DEFINE_KERNELS(c128, double)

typedef struct {
    long long B, T, N, b0, b1, n0, n1, t0, t1;
} Range;

static int check_range(const Range *r) {
    if (r->T < 1 || r->N < 1 || r->b0 < 0 || r->b1 > r->B || r->b1 <= r->b0 || r->n0 < 0 ||
        r->n1 > r->N || r->n1 <= r->n0 || r->t0 < 0 || r->t1 > r->T || r->t1 <= r->t0) {
        PyErr_Format(PyExc_ValueError,
                     "bad scan range B=%lld T=%lld N=%lld rows [%lld, %lld) channels [%lld, %lld) "
                     "steps [%lld, %lld)",
                     r->B, r->T, r->N, r->b0, r->b1, r->n0, r->n1, r->t0, r->t1);
        return 0;
    }
    return 1;
}

#define RANGE_FORMAT "LLLLLLLLL"
#define RANGE_ARGS(r) &r.B, &r.T, &r.N, &r.b0, &r.b1, &r.n0, &r.n1, &r.t0, &r.t1

/* Runs CALL for every row and every block of at most BLOCK channels, without the GIL. */
#define FOR_BLOCKS(r, CALL)                                                                       \
    Py_BEGIN_ALLOW_THREADS for (int64_t b = r.b0; b < r.b1; ++b) {                                \
        for (int64_t lo = r.n0; lo < r.n1; lo += BLOCK) {                                         \
            const int64_t hi = lo + BLOCK < r.n1 ? lo + BLOCK : r.n1;                             \
            CALL;                                                                                 \
        }                                                                                         \
    }                                                                                             \
    Py_END_ALLOW_THREADS

typedef unsigned long long Ptr;

static PyObject *py_forward(PyObject *self, PyObject *args) {
    (void)self;
    int dbl, tv;
    Ptr lam, x, h, h0;
    Range r;
    if (!PyArg_ParseTuple(args, "pKpKKK" RANGE_FORMAT, &dbl, &lam, &tv, &x, &h, &h0, RANGE_ARGS(r)))
        return NULL;
    if (!check_range(&r)) return NULL;
    FOR_BLOCKS(r, dbl ? forward_c128((const double *)lam, tv, (const double *)x, (double *)h,
                                     (const double *)h0, r.T, r.N, b, lo, hi, r.t0, r.t1)
                      : forward_c64((const float *)lam, tv, (const float *)x, (float *)h,
                                    (const float *)h0, r.T, r.N, b, lo, hi, r.t0, r.t1));
    Py_RETURN_NONE;
}

static PyObject *py_fixup_forward(PyObject *self, PyObject *args) {
    (void)self;
    int dbl, tv;
    Ptr lam, h, carry;
    Range r;
    if (!PyArg_ParseTuple(args, "pKpKK" RANGE_FORMAT, &dbl, &lam, &tv, &h, &carry, RANGE_ARGS(r)))
        return NULL;
    if (!check_range(&r)) return NULL;
    FOR_BLOCKS(r, dbl ? fixup_forward_c128((const double *)lam, tv, (double *)h,
                                           (const double *)carry, r.T, r.N, b, lo, hi, r.t0, r.t1)
                      : fixup_forward_c64((const float *)lam, tv, (float *)h, (const float *)carry,
                                          r.T, r.N, b, lo, hi, r.t0, r.t1));
    Py_RETURN_NONE;
}

static PyObject *py_backward(PyObject *self, PyObject *args) {
    (void)self;
    int dbl, tv;
    Ptr lam, g, g_last, h, h0, grad_x, grad_lam;
    Range r;
    if (!PyArg_ParseTuple(args, "pKpKKKKKK" RANGE_FORMAT, &dbl, &lam, &tv, &g, &g_last, &h, &h0,
                          &grad_x, &grad_lam, RANGE_ARGS(r)))
        return NULL;
    if (!check_range(&r)) return NULL;
    FOR_BLOCKS(r, dbl ? backward_c128((const double *)lam, tv, (const double *)g,
                                      (const double *)g_last, (const double *)h,
                                      (const double *)h0, (double *)grad_x, (double *)grad_lam,
                                      r.T, r.N, b, lo, hi, r.t0, r.t1)
                      : backward_c64((const float *)lam, tv, (const float *)g,
                                     (const float *)g_last, (const float *)h, (const float *)h0,
                                     (float *)grad_x, (float *)grad_lam, r.T, r.N, b, lo, hi,
                                     r.t0, r.t1));
    Py_RETURN_NONE;
}

static PyObject *py_fixup_backward(PyObject *self, PyObject *args) {
    (void)self;
    int dbl, tv;
    Ptr lam, grad_x, carry, h, h0, grad_lam;
    Range r;
    if (!PyArg_ParseTuple(args, "pKpKKKKK" RANGE_FORMAT, &dbl, &lam, &tv, &grad_x, &carry, &h,
                          &h0, &grad_lam, RANGE_ARGS(r)))
        return NULL;
    if (!check_range(&r)) return NULL;
    FOR_BLOCKS(r, dbl ? fixup_backward_c128((const double *)lam, tv, (double *)grad_x,
                                            (const double *)carry, (const double *)h,
                                            (const double *)h0, (double *)grad_lam, r.T, r.N, b,
                                            lo, hi, r.t0, r.t1)
                      : fixup_backward_c64((const float *)lam, tv, (float *)grad_x,
                                           (const float *)carry, (const float *)h,
                                           (const float *)h0, (float *)grad_lam, r.T, r.N, b, lo,
                                           hi, r.t0, r.t1));
    Py_RETURN_NONE;
}

/* Asks the kernel for transparent huge pages on a fresh, untouched buffer. Writing a new
 * output costs mostly first-touch page faults with 4 KiB pages; 2 MiB pages cut them 512-fold.
 * Advice only: where THP is off or unsupported nothing changes. Returns True if accepted. */
static PyObject *py_advise_huge_pages(PyObject *self, PyObject *args) {
    (void)self;
    Ptr address;
    unsigned long long nbytes;
    if (!PyArg_ParseTuple(args, "KK", &address, &nbytes)) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const unsigned long long huge = 2ULL << 20;
    const unsigned long long start = (address + huge - 1) & ~(huge - 1);
    const unsigned long long end = (address + nbytes) & ~(huge - 1);
    if (end > start && madvise((void *)start, end - start, MADV_HUGEPAGE) == 0) Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"advise_huge_pages", py_advise_huge_pages, METH_VARARGS, "madvise(MADV_HUGEPAGE) a buffer."},
    {"forward", py_forward, METH_VARARGS, "Scan a stretch of time from h0 or zero."},
    {"fixup_forward", py_fixup_forward, METH_VARARGS, "Add a carried-in state to a stretch."},
    {"backward", py_backward, METH_VARARGS, "Adjoint scan of a stretch of time."},
    {"fixup_backward", py_fixup_backward, METH_VARARGS, "Add a carried-in adjoint to a stretch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cscan", "CPU scan kernels", -1, methods, NULL, NULL, NULL, NULL,
};

#ifndef SCAN_COMPILE_FLAGS
#define SCAN_COMPILE_FLAGS "unknown"
#endif

/* The module, with how it was built: flags from setup.py, the compiler's own version. */
PyMODINIT_FUNC PyInit__cscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#ifdef __VERSION__
    const char *compiler = __VERSION__;
#else
    const char *compiler = "unknown";
#endif
    if (PyModule_AddStringConstant(m, "compile_flags", SCAN_COMPILE_FLAGS) < 0 ||
        PyModule_AddStringConstant(m, "compiler", compiler) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
