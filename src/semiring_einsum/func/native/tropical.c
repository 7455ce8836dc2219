/* semiring_einsum's native kernels (see semiring_einsum/func/_native.py, which builds this
   file with the system C compiler and loads it with ctypes; docs/internals.md).  No torch
   headers: every function takes raw pointers, sizes and strides.

   maxplus.h is instantiated once per dtype by the preprocessor, tiles.h once per variant
   of it, copy.h once per element width. */

#include <stdint.h>
#include <math.h>
#include <limits.h>
#include <string.h>
#include <stdlib.h>

#define RB 4   /* rows of the left operand per tile */
#define NB 128 /* columns of the right operand per tile */
#define KC 32  /* columns per tile of the k-best kernel */

#define CAT(a, b) CAT_(a, b)
#define CAT_(a, b) a##b
#define FN(suffix) CAT(PREFIX, suffix) /* PREFIX_suffix, in maxplus.h and tiles.h */

#define SCALAR float
#define IDX int32_t
#define PREFIX maxplus_f32
#include "maxplus.h"
#undef SCALAR
#undef IDX
#undef PREFIX

#define SCALAR double
#define IDX int64_t
#define PREFIX maxplus_f64
#include "maxplus.h"
#undef SCALAR
#undef IDX
#undef PREFIX

/* A strided view walked in row-major order, for the loops below.  The view's dims are
   merged where they can be; the trailing ones, until they hold at least 128 elements (at
   most 4096: a bigger table costs more than it saves), are visited through a table of
   source offsets, the leading ones by counters. */
typedef struct {
    int64_t n[16], s[16];  /* the merged dims */
    int c, split;          /* their count; the first one inside the table */
    int64_t total, inner, outer;
    int64_t* off;          /* inner source offsets (0: one strided dim inside) */
} walk_t;

static void walk_plan(walk_t* w, int nd, const int64_t* sizes, const int64_t* strides) {
    int c = 0;
    w->total = 1;
    w->off = 0;
    for (int d = 0; d < nd; d++) {
        w->total *= sizes[d];
        if (sizes[d] == 1) continue;
        if (c > 0 && w->s[c - 1] == strides[d] * sizes[d]) {
            w->n[c - 1] *= sizes[d]; w->s[c - 1] = strides[d];
        } else {
            w->n[c] = sizes[d]; w->s[c] = strides[d]; c++;
        }
    }
    w->c = c;
    if (c == 0) { w->split = 0; w->inner = 1; w->outer = w->total; return; }
    int split = c - 1;
    int64_t inner = w->n[c - 1];
    while (split > 0 && inner < 128 && inner * w->n[split - 1] <= 4096) inner *= w->n[--split];
    if (split < c - 1) {  /* several dims inside: their source offsets, row-major */
        w->off = (int64_t*)malloc(sizeof(int64_t) * inner);
        if (!w->off) { split = c - 1; inner = w->n[c - 1]; }
        else {
            int64_t filled = 1;  /* off[0 .. filled): the dims after d, row-major */
            w->off[0] = 0;
            for (int d = c - 1; d >= split; d--) {
                for (int64_t i = filled * w->n[d] - 1; i >= filled; i--)
                    w->off[i] = w->off[i % filled] + (i / filled) * w->s[d];
                filled *= w->n[d];
            }
        }
    }
    w->split = split;
    w->inner = inner;
    w->outer = w->total ? w->total / inner : 0;
}

/* The source offset of row-major block o (of inner elements). */
static inline int64_t walk_base(const walk_t* w, int64_t o) {
    int64_t base = 0;
    for (int d = w->split - 1; d >= 0; d--) { base += (o % w->n[d]) * w->s[d]; o /= w->n[d]; }
    return base;
}

#define WIDTH 32
#define UINT uint32_t
#include "copy.h"
#undef WIDTH
#undef UINT

#define WIDTH 64
#define UINT uint64_t
#include "copy.h"
#undef WIDTH
#undef UINT

/* A step's linear argmax (an int64 view, walked row-major: the permute back to the
   output's order) to coordinates, one row of ``table`` (terms x nw, the coordinates of
   every linear index) per cell: what the permute's copy and a lookup do, in one pass. */
int unravel_64(const int64_t* lin, const int64_t* table, int64_t* out, int nd,
               const int64_t* sizes, const int64_t* strides, int nw, int nthreads) {
    walk_t w;
    walk_plan(&w, nd, sizes, strides);
    if (w.total == 0) return 0;
    const int64_t inner = w.inner, last = w.c ? w.s[w.c - 1] : 0;
    int64_t* off = w.off;
    if (!off) {  /* (one loop below: one strided dim inside is a table too) */
        off = (int64_t*)malloc(sizeof(int64_t) * inner);
        if (!off) return 1;  /* (the caller's fallback runs) */
        for (int64_t j = 0; j < inner; j++) off[j] = j * last;
    }
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t o = 0; o < w.outer; o++) {
        const int64_t* sp = lin + walk_base(&w, o);
        int64_t* dp = out + o * inner * nw;
        if (nw == 2)  /* (the common case, as one 16-byte move: 2.3x faster) */
            for (int64_t j = 0; j < inner; j++) memcpy(dp + 2 * j, table + 2 * sp[off[j]], 16);
        else
            for (int64_t j = 0; j < inner; j++) {
                const int64_t* row = table + sp[off[j]] * nw;
                for (int v = 0; v < nw; v++) dp[j * nw + v] = row[v];
            }
    }
    free(off);
    return 0;
}

/* Whether every element of a contiguous float array is finite: its exponent bits are not
   all ones (an integer OR over the elements, which vectorizes without -ffast-math). */
int all_finite_32(const uint32_t* x, int64_t n) {
    uint32_t hit = 0;
    for (int64_t i = 0; i < n; i++) hit |= (x[i] & 0x7f800000u) == 0x7f800000u;
    return !hit;
}

int all_finite_64(const uint64_t* x, int64_t n) {
    uint64_t hit = 0;
    for (int64_t i = 0; i < n; i++)
        hit |= (x[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    return !hit;
}
