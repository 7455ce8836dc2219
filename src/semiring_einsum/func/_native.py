"""The native max-plus kernel: a small C file built once per machine, called through ctypes.

Max-plus has no BLAS.  Broadcast-and-reduce in torch writes every term to memory; a fused
loop that keeps each output row's running maximum and argmax in cache does one add, one
compare and two blends per term, vectorized by the C compiler.  This module holds that loop
(:data:`SOURCE`), builds it with the system C compiler (``cc``, or ``$CC``) the first time a
process needs it, caches the shared library under the user's cache directory (keyed by the
source, the flags, the compiler and the CPU), and loads it with :mod:`ctypes` (which releases
the GIL during the call).  OpenMP splits the work over ``torch.get_num_threads()`` threads;
in a process that has loaded torch, the library's ``libgomp.so.1`` is the one torch already
loaded, so both share one thread pool.

Where no compiler is found, the build fails, or ``SEMIRING_EINSUM_NATIVE=0`` is set, nothing
is built and the plan keeps the pure-torch kernels (:func:`status` says why).  The kernel
serves the max-plus steps of two float32/float64 CPU operands whose summed indices all appear
in both operands (the matrix-product shape: batch, rows, sums, columns; see
:func:`layout`); semantics are those of every max-plus kernel here: ties to the first
maximiser in row-major order of the step's summed indices, NaN wins (the first NaN), a cell
whose terms are all -inf is -inf with argmax 0.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _kernels as K
from ._context import untraced
from ._plan import Step

Tensor = torch.Tensor

_HEADER = r"""
#include <stdint.h>
#include <math.h>
#include <limits.h>
#include <string.h>
#include <stdlib.h>

#define RB 4   /* rows of the left operand per tile */
#define NB 128 /* columns of the right operand per tile */
#define KC 32  /* columns per tile of the k-best kernel */
"""

# One tile: rows x cols cells, each the max over s < k of a[r, s] + b[s, j].  best and arg
# live in the tile's arrays (in L1) while s runs; a later s wins only on a strictly larger
# value, or ("nan" variant) with the first NaN (v != v) over a cell that is not NaN yet.
# The "clean" variant, for operands where no term can be NaN, skips those tests.
_TILES = r"""
static inline __attribute__((always_inline)) void NAME_values_VARIANT(
    const SCALAR* a, const SCALAR* b, SCALAR* c, int64_t rows, int64_t k, int64_t cols,
    int64_t sam, int64_t sak, int64_t sbk, int64_t ldc) {
    SCALAR best[RB][NB];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < NB; j++) best[r][j] = -INFINITY;
    for (int64_t s = 0; s < k; s++) {
        const SCALAR* restrict brow = b + s * sbk;
        for (int64_t r = 0; r < rows; r++) {
            const SCALAR av = a[r * sam + s * sak];
            SCALAR* restrict bb = best[r];
            for (int64_t j = 0; j < cols; j++) {
                SCALAR v = av + brow[j];
                bb[j] = (VALUE_WINS) ? v : bb[j];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j++) c[r * ldc + j] = best[r][j];
}

static inline __attribute__((always_inline)) void NAME_indexed_VARIANT(
    const SCALAR* a, const SCALAR* b, SCALAR* c, int64_t* idx, int64_t rows, int64_t k,
    int64_t cols, int64_t sam, int64_t sak, int64_t sbk, int64_t ldc) {
    SCALAR best[RB][NB];
    IDX arg[RB][NB];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < NB; j++) { best[r][j] = -INFINITY; arg[r][j] = 0; }
    for (int64_t s = 0; s < k; s++) {
        const SCALAR* restrict brow = b + s * sbk;
        const IDX si = (IDX)s;
        for (int64_t r = 0; r < rows; r++) {
            const SCALAR av = a[r * sam + s * sak];
            SCALAR* restrict bb = best[r];
            IDX* restrict aa = arg[r];
            for (int64_t j = 0; j < cols; j++) {
                SCALAR v = av + brow[j];
                SCALAR o = bb[j];
                int up = INDEX_WINS;
                bb[j] = up ? v : o;
                aa[j] = up ? si : aa[j];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j++) {
            c[r * ldc + j] = best[r][j];
            idx[r * ldc + j] = (int64_t)arg[r][j];
        }
}
"""

_DRIVER = r"""
/* Work item w of the output's tiles (row tiles fastest, so a thread's items share the
   right operand's columns): its batch, first row and column, and extents. */
static inline void NAME_tile(int64_t w, int64_t mt, int64_t nt, int64_t m, int64_t n,
                             int64_t* bt, int64_t* r0, int64_t* j0, int64_t* rows,
                             int64_t* cols) {
    *bt = w / (mt * nt);
    *r0 = (w % mt) * RB;
    *j0 = ((w / mt) % nt) * NB;
    *rows = m - *r0 < RB ? m - *r0 : RB;
    *cols = n - *j0 < NB ? n - *j0 : NB;
}

/* One tile on the loop its data needs (inlined: a call with constant extents gets loops
   with constant bounds). */
static inline __attribute__((always_inline)) void NAME_run(
    const SCALAR* a, const SCALAR* b, SCALAR* c, int64_t* idx, int64_t rows, int64_t k,
    int64_t cols, int64_t sam, int64_t sak, int64_t sbk, int64_t ldc, int clean) {
    if (idx && clean)
        NAME_indexed_clean(a, b, c, idx, rows, k, cols, sam, sak, sbk, ldc);
    else if (idx)
        NAME_indexed_nan(a, b, c, idx, rows, k, cols, sam, sak, sbk, ldc);
    else if (clean)
        NAME_values_clean(a, b, c, rows, k, cols, sam, sak, sbk, ldc);
    else
        NAME_values_nan(a, b, c, rows, k, cols, sam, sak, sbk, ldc);
}

/* Which of NaN, +inf, -inf occur in x[i0, i1, i2] (strided; a 0 stride is scanned once). */
static int NAME_scan(const SCALAR* x, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1,
                     int64_t s2) {
    int nan = 0, pinf = 0, ninf = 0;
    if (s0 == 0) n0 = n0 > 0 ? 1 : 0;
    if (s1 == 0) n1 = n1 > 0 ? 1 : 0;
    if (s2 == 0) n2 = n2 > 0 ? 1 : 0;
    for (int64_t i0 = 0; i0 < n0; i0++)
        for (int64_t i1 = 0; i1 < n1; i1++) {
            const SCALAR* row = x + i0 * s0 + i1 * s1;
            for (int64_t i2 = 0; i2 < n2; i2++) {
                const SCALAR v = row[i2 * s2];
                nan |= v != v;
                pinf |= v == INFINITY;
                ninf |= v == -INFINITY;
            }
        }
    return nan | (pinf << 1) | (ninf << 2);
}

/* c[bt, i, j] = max_s a[bt, i, s] + b[bt, s, j] (and its first argmax s when idx is not
   NULL); a and b strided (b's columns contiguous), c and idx contiguous.  The NaN-aware
   loops run only where a term can be NaN: a NaN operand, or +inf meeting -inf. */
void NAME(const SCALAR* a, const SCALAR* b, SCALAR* c, int64_t* idx, int64_t nb, int64_t m,
          int64_t k, int64_t n, int64_t sab, int64_t sam, int64_t sak, int64_t sbb,
          int64_t sbk, int nthreads) {
    const int fa = NAME_scan(a, nb, m, k, sab, sam, sak);
    const int fb = NAME_scan(b, nb, k, n, sbb, sbk, 1);
    const int clean = !((fa | fb) & 1) && !((fa & 2) && (fb & 4)) && !((fa & 4) && (fb & 2));
    const int64_t mt = (m + RB - 1) / RB, nt = (n + NB - 1) / NB;
    const int64_t total = nb * nt * mt;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t w = 0; w < total; w++) {
        int64_t bt, r0, j0, rows, cols;
        NAME_tile(w, mt, nt, m, n, &bt, &r0, &j0, &rows, &cols);
        const SCALAR* at = a + bt * sab + r0 * sam;
        const SCALAR* btile = b + bt * sbb + j0;
        const int64_t off = (bt * m + r0) * n + j0;
        int64_t* it = idx ? idx + off : 0;
        if (rows == RB && cols == NB)  /* a full tile: the loops with constant bounds */
            NAME_run(at, btile, c + off, it, RB, k, NB, sam, sak, sbk, n, clean);
        else
            NAME_run(at, btile, c + off, it, rows, k, cols, sam, sak, sbk, n, clean);
    }
}

/* Ranked: ties (and NaN against NaN) go to the smallest rank ra[bt, i, s] + rb[bt, s, j] +
   w[s] (ra, rb strided, either may be NULL: 0); writes the values, the argmax s and the
   winner's rank.  A cell starts at -inf with no rank, so the first term always enters. */
void NAME_ranked(const SCALAR* a, const SCALAR* b, const int64_t* ra, const int64_t* rb,
                 const int64_t* w, SCALAR* c, int64_t* idx, int64_t* rout, int64_t nb,
                 int64_t m, int64_t k, int64_t n, int64_t sab, int64_t sam, int64_t sak,
                 int64_t sbb, int64_t sbk, int64_t rsab, int64_t rsam, int64_t rsak,
                 int64_t rsbb, int64_t rsbk, int64_t rsbn, int nthreads) {
    const int64_t mt = (m + RB - 1) / RB, nt = (n + NB - 1) / NB;
    const int64_t total = nb * nt * mt;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t wi = 0; wi < total; wi++) {
        int64_t bt, r0, j0, rows, cols;
        NAME_tile(wi, mt, nt, m, n, &bt, &r0, &j0, &rows, &cols);
        SCALAR best[RB][NB];
        int64_t rank[RB][NB], arg[RB][NB];
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < cols; j++) {
                best[r][j] = -INFINITY; rank[r][j] = INT64_MAX; arg[r][j] = 0;
            }
        for (int64_t s = 0; s < k; s++) {
            const SCALAR* brow = b + bt * sbb + s * sbk + j0;
            const int64_t* rbrow = rb ? rb + bt * rsbb + s * rsbk + j0 * rsbn : 0;
            for (int64_t r = 0; r < rows; r++) {
                const SCALAR av = a[bt * sab + (r0 + r) * sam + s * sak];
                const int64_t base = (ra ? ra[bt * rsab + (r0 + r) * rsam + s * rsak] : 0) + w[s];
                SCALAR* restrict bb = best[r];
                int64_t* restrict rr = rank[r];
                int64_t* restrict aa = arg[r];
                if (rbrow) {
                    for (int64_t j = 0; j < cols; j++) {
                        const SCALAR v = av + brow[j], o = bb[j];
                        const int64_t rk = base + rbrow[j * rsbn], ro = rr[j];
                        const int vn = v != v, on = o != o, earlier = rk < ro;
                        const int up = (!vn & !on & ((v > o) | ((v == o) & earlier)))
                                     | (vn & !on) | (vn & on & earlier);
                        bb[j] = up ? v : o; rr[j] = up ? rk : ro; aa[j] = up ? s : aa[j];
                    }
                } else {  /* the right operand carries no rank: one rank per (row, s) */
                    for (int64_t j = 0; j < cols; j++) {
                        const SCALAR v = av + brow[j], o = bb[j];
                        const int64_t ro = rr[j];
                        const int vn = v != v, on = o != o, earlier = base < ro;
                        const int up = (!vn & !on & ((v > o) | ((v == o) & earlier)))
                                     | (vn & !on) | (vn & on & earlier);
                        bb[j] = up ? v : o; rr[j] = up ? base : ro; aa[j] = up ? s : aa[j];
                    }
                }
            }
        }
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < cols; j++) {
                const int64_t off = (bt * m + r0 + r) * n + j0 + j;
                c[off] = best[r][j]; idx[off] = arg[r][j]; rout[off] = rank[r][j];
            }
    }
}

/* The vjp from the argmax: ga[bt, i, s] += g[bt, i, j] and gb[bt, s, j] += g[bt, i, j] at
   s = idx[bt, i, j] (ga, gb zeroed by the caller; either may be NULL).  Batches write
   disjoint parts, so they run in parallel; inside one the order is fixed (deterministic). */
void NAME_vjp(const SCALAR* g, const int64_t* idx, SCALAR* ga, SCALAR* gb, int64_t nb,
              int64_t m, int64_t k, int64_t n, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t bt = 0; bt < nb; bt++) {
        const SCALAR* gt = g + bt * m * n;
        const int64_t* it = idx + bt * m * n;
        SCALAR* at = ga ? ga + bt * m * k : 0;
        SCALAR* bb = gb ? gb + bt * k * n : 0;
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                const int64_t s = it[i * n + j];
                const SCALAR v = gt[i * n + j];
                if (at) at[i * k + s] += v;
                if (bb) bb[s * n + j] += v;
            }
    }
}
"""

# k-best: per cell the k best terms, best first: NaN first (by rank), then by value
# descending, ties by rank ascending; a slot is (value, rank, id), an empty slot
# (-inf, PAD, -1).  Terms a[bt, i, s, p] + b[bt, s, q, j] with rank ra[bt, i, s, p] +
# rb[bt, s, q, j] + w[s] (ra, rb may be NULL: 0) and id s * S + p * ma + q * mb, where p
# and q run over the operands' own k-best lists (KA, KB: 1 for a plain operand).  A term
# enters a cell when it beats the cell's worst slot (rare once the lists fill up), and
# moves up by insertion.  Cells are written straight into the outputs (nb, m, n, K).
_KBEST = r"""
/* Whether (v, r) beats (o, ro): NaN first (by rank), then value descending, rank ascending.
   Branch-free, so that a loop of tests vectorizes. */
static inline int NAME_beats(SCALAR v, int64_t r, SCALAR o, int64_t ro) {
    const int vn = v != v, on = o != o, lt = r < ro;
    return (vn & (!on | lt)) | (!vn & !on & ((v > o) | ((v == o) & lt)));
}

/* Insert (v, r, id) into a cell's sorted list of K, which it beats at its last slot. */
static inline void NAME_insert(SCALAR* lv, int64_t* lr, int64_t* li, int64_t K, SCALAR v,
                               int64_t r, int64_t id) {
    int64_t t = K - 1;
    if (v == v) {  /* the common case: no NaN to move past (NaN entries stay in front) */
        while (t > 0) {
            const SCALAR o = lv[t - 1];
            if (!((v > o) | ((v == o) & (r < lr[t - 1])))) break;
            lv[t] = o; lr[t] = lr[t - 1]; li[t] = li[t - 1];
            t--;
        }
    } else {
        while (t > 0 && NAME_beats(v, r, lv[t - 1], lr[t - 1])) {
            lv[t] = lv[t - 1]; lr[t] = lr[t - 1]; li[t] = li[t - 1];
            t--;
        }
    }
    lv[t] = v; lr[t] = r; li[t] = id;
}

void NAME_kbest(const SCALAR* a, const SCALAR* b, const int64_t* ra, const int64_t* rb,
                const int64_t* w, const int64_t* ord, SCALAR* cv, int64_t* cr, int64_t* ci,
                int64_t nb, int64_t m,
                int64_t kk, int64_t n, int64_t KA, int64_t KB, int64_t K, int64_t sab,
                int64_t sam, int64_t sak, int64_t sap, int64_t sbb, int64_t sbk, int64_t sbq,
                int64_t rsab, int64_t rsam, int64_t rsak, int64_t rsap, int64_t rsbb,
                int64_t rsbk, int64_t rsbq, int64_t S, int64_t ma, int64_t mb, int64_t pad,
                int nthreads) {
    /* KC columns per tile: the tile's lists (RB x KC cells of K slots) stay in L1. */
    const int64_t mt = (m + RB - 1) / RB, nt = (n + KC - 1) / KC;
    const int64_t total = nb * nt * mt;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t wi = 0; wi < total; wi++) {
        const int64_t bt = wi / (mt * nt);
        const int64_t r0 = (wi % mt) * RB, j0 = ((wi / mt) % nt) * KC;
        const int64_t rows = m - r0 < RB ? m - r0 : RB, cols = n - j0 < KC ? n - j0 : KC;
        SCALAR wv[RB][KC];  /* each cell's worst slot: what a term must beat to enter */
        int64_t wr[RB][KC];
        unsigned char enter[KC] = {0};  /* (zero past the tile's columns) */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < cols; j++) {
                const int64_t off = ((bt * m + r0 + r) * n + j0 + j) * K;
                for (int64_t t = 0; t < K; t++) {
                    cv[off + t] = -INFINITY; cr[off + t] = pad; ci[off + t] = -1;
                }
                wv[r][j] = -INFINITY; wr[r][j] = pad;
            }
        for (int64_t r = 0; r < rows; r++) {
            /* The row's sums in the order given (its best terms of ``a`` first, so that
               the lists fill with good terms early and few later terms enter). */
            const int64_t* order = ord ? ord + (bt * m + r0 + r) * kk : 0;
            for (int64_t si = 0; si < kk; si++) {
                const int64_t s = order ? order[si] : si;
                const SCALAR* b0 = b + bt * sbb + s * sbk + j0;
                const int64_t* rb0 = rb ? rb + bt * rsbb + s * rsbk + j0 : 0;
                const SCALAR* ar = a + bt * sab + (r0 + r) * sam + s * sak;
                const int64_t* rar = ra ? ra + bt * rsab + (r0 + r) * rsam + s * rsak : 0;
                /* The lists are sorted best first, so a term of slots (p, q) enters only if
                   (p - 1, q) and (p, q - 1) do: test (0, 0) for every column at once. */
                const SCALAR av = ar[0];
                SCALAR* restrict wvr = wv[r];
                int64_t* restrict wrr = wr[r];
                /* A value test first (ties and NaN pass: the exact test follows), which
                   vectorizes; then whole words of columns where none passed are skipped. */
                for (int64_t j = 0; j < cols; j++) {
                    const SCALAR v = av + b0[j];
                    enter[j] = (v >= wvr[j]) | (v != v);
                }
                for (int64_t j = 0; j < cols; j++) {
                    if ((j & 7) == 0) {
                        uint64_t word;
                        memcpy(&word, enter + j, 8);
                        if (!word) { j += 7; continue; }
                    }
                    if (!enter[j]) continue;
                    const int64_t off = ((bt * m + r0 + r) * n + j0 + j) * K;
                    for (int64_t p = 0; p < KA; p++) {
                        const SCALAR ap = ar[p * sap];
                        const int64_t rp = (rar ? rar[p * rsap] : 0) + w[s];
                        int64_t q = 0;
                        for (; q < KB; q++) {
                            const SCALAR v = ap + b0[q * sbq + j];
                            const int64_t rk = rp + (rb0 ? rb0[q * rsbq + j] : 0);
                            if (!NAME_beats(v, rk, wvr[j], wrr[j])) break;
                            NAME_insert(cv + off, cr + off, ci + off, K, v, rk,
                                        s * S + p * ma + q * mb);
                            wvr[j] = cv[off + K - 1]; wrr[j] = cr[off + K - 1];
                        }
                        if (q == 0) break;  /* (p, 0) did not enter: no (p' > p, q) will */
                    }
                }
            }
        }
    }
}
"""

# Inverse-CDF draws by blocks (see ``_sample._draw_blocks``): per row, a block from its
# cell's block sums, then an entry of that block from its weights pa * pb.  -1 where the
# total is not above ``safe`` or the block's weights are all 0 (the caller draws those rows
# exactly).  A cumulative sum that rounding leaves at or below the target takes the last
# entry of positive weight, never one of weight 0.
_DRAW = r"""
void NAME_draw(const SCALAR* sums, const SCALAR* pa, const SCALAR* pb, const int64_t* t,
               const int64_t* i, const int64_t* j, const SCALAR* u, int64_t* out, int64_t rows,
               int64_t m, int64_t n, int64_t nblk, int64_t width, double safe, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t ti = t[r] * m + i[r];
        const SCALAR* s = sums + (ti * n + j[r]) * nblk;
        SCALAR total = 0;
        for (int64_t b = 0; b < nblk; b++) total += s[b];
        if (!((double)total > safe)) { out[r] = -1; continue; }
        const SCALAR target = u[2 * r] * total;
        int64_t blk = -1, last = 0;
        SCALAR acc = 0;
        for (int64_t b = 0; b < nblk; b++) {
            if (s[b] > 0) last = b;
            acc += s[b];
            if (acc > target) { blk = b; break; }
        }
        if (blk < 0) blk = last;
        const SCALAR* wa = pa + (ti * nblk + blk) * width;
        const SCALAR* wb = pb + ((t[r] * n + j[r]) * nblk + blk) * width;
        SCALAR total2 = 0;
        for (int64_t l = 0; l < width; l++) total2 += wa[l] * wb[l];
        if (!(total2 > 0)) { out[r] = -1; continue; }
        const SCALAR target2 = u[2 * r + 1] * total2;
        int64_t pick = -1, last2 = 0;
        acc = 0;
        for (int64_t l = 0; l < width; l++) {
            const SCALAR wl = wa[l] * wb[l];
            if (wl > 0) last2 = l;
            acc += wl;
            if (acc > target2) { pick = l; break; }
        }
        if (pick < 0) pick = last2;
        out[r] = blk * width + pick;
    }
}
"""

# A strided view walked in row-major order, for the loops below.  The view's dims are
# merged where they can be; the trailing ones, until they hold at least 128 elements (at
# most 4096: a bigger table costs more than it saves), are visited through a table of
# source offsets, the leading ones by counters.
_WALK = r"""
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
"""

# A strided view copied into contiguous memory (what ``reshape`` of a permuted operand and
# ``contiguous`` do; torch's loop runs 1.5x slower on copies whose innermost dims are a few
# elements long, like the stack RNN's POP operand).  Elements move as integers of their
# width.
_COPY = r"""
void copy_WIDTH(const uintWIDTH_t* src, uintWIDTH_t* dst, int nd, const int64_t* sizes,
                const int64_t* strides, int nthreads) {
    walk_t w;
    walk_plan(&w, nd, sizes, strides);
    if (w.total == 0) return;
    if (w.c == 0) { dst[0] = src[0]; return; }
    const int64_t inner = w.inner, last = w.s[w.c - 1];
    const int64_t* off = w.off;
    /* (Two loops, not one with a test inside: that one runs 15% slower.) */
    if (off) {
        #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
        for (int64_t o = 0; o < w.outer; o++) {
            const uintWIDTH_t* sp = src + walk_base(&w, o);
            uintWIDTH_t* dp = dst + o * inner;
            for (int64_t j = 0; j < inner; j++) dp[j] = sp[off[j]];
        }
    } else {
        #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
        for (int64_t o = 0; o < w.outer; o++) {
            const uintWIDTH_t* sp = src + walk_base(&w, o);
            uintWIDTH_t* dp = dst + o * inner;
            for (int64_t j = 0; j < inner; j++) dp[j] = sp[j * last];
        }
    }
    free(w.off);
}
"""

# A step's linear argmax (an int64 view, walked row-major: the permute back to the
# output's order) to coordinates, one row of ``table`` (terms x nw, the coordinates of
# every linear index) per cell: what the permute's copy and a lookup do, in one pass.
_UNRAVEL = r"""
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
"""

# Whether every element of a contiguous float array is finite: its exponent bits are not
# all ones (an integer OR over the elements, which vectorizes without -ffast-math).
_FINITE = r"""
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
"""

# The log BLAS route's certificate where some cells may be all -inf: whether every cell of
# log S passes (is >= bound; NaN fails) or is dead (the sum of its operands' row maxima is
# -inf: its terms are all -inf, and log S = log 0 is its exact value).  One walk over the
# output with three sets of strides (the maxima broadcast), instead of four torch calls
# on output-sized tensors.
_CERTIFY = r"""
int NAME_certified_dead(const SCALAR* ls, const SCALAR* ma, const SCALAR* mb, int nd,
                        const int64_t* sizes, const int64_t* sl, const int64_t* sa,
                        const int64_t* sb, double bound) {
    int64_t idx[16] = {0}, total = 1, n_[16], l_[16], a_[16], b_[16];
    int c = 0;
    for (int d = 0; d < nd; d++) total *= sizes[d];
    if (total == 0) return 1;
    /* log S's memory order (its dims by stride, largest first), size-1 dims dropped,
       neighbours merged where all three views allow */
    int order[16];
    for (int d = 0; d < nd; d++) {
        int k = c++;
        while (k > 0 && sl[order[k - 1]] < sl[d]) { order[k] = order[k - 1]; k--; }
        order[k] = d;
    }
    c = 0;
    for (int k = 0; k < nd; k++) {
        const int d = order[k];
        if (sizes[d] == 1) continue;
        if (c > 0 && l_[c - 1] == sl[d] * sizes[d] && a_[c - 1] == sa[d] * sizes[d]
            && b_[c - 1] == sb[d] * sizes[d]) {
            n_[c - 1] *= sizes[d]; l_[c - 1] = sl[d]; a_[c - 1] = sa[d]; b_[c - 1] = sb[d];
        } else {
            n_[c] = sizes[d]; l_[c] = sl[d]; a_[c] = sa[d]; b_[c] = sb[d]; c++;
        }
    }
    nd = c; sizes = n_; sl = l_; sa = a_; sb = b_;
    const int last = nd - 1;
    const int64_t n = nd ? sizes[last] : 1;
    const int64_t jl = nd ? sl[last] : 0, ja = nd ? sa[last] : 0, jb = nd ? sb[last] : 0;
    int64_t ol = 0, oa = 0, ob = 0;
    const SCALAR lower = (SCALAR)bound;  /* (exact: the bound is an integer) */
    for (int64_t i = 0; i < total; i += n) {
        int bad = 0;  /* (no exit inside: the loop vectorizes) */
        for (int64_t j = 0; j < n; j++)
            bad |= !(ls[ol + j * jl] >= lower) & (ma[oa + j * ja] + mb[ob + j * jb] != -INFINITY);
        if (bad) return 0;
        for (int d = last - 1; d >= 0; d--) {  /* the next row: carry the counters */
            ol += sl[d]; oa += sa[d]; ob += sb[d];
            if (++idx[d] < sizes[d]) break;
            ol -= sl[d] * sizes[d]; oa -= sa[d] * sizes[d]; ob -= sb[d] * sizes[d];
            idx[d] = 0;
        }
    }
    return 1;
}
"""

_WINS = {
    "nan": ("(v > bb[j]) | (v != v)", "(v > o) | ((v != v) & (o == o))"),
    "clean": ("v > bb[j]", "v > o"),
}


def _source() -> str:
    """The C file: per dtype, the tile loops (NaN-aware and clean), the driver, the vjp."""
    parts = [_HEADER]
    for t, idx, name in (("float", "int32_t", "maxplus_f32"), ("double", "int64_t", "maxplus_f64")):
        for variant, (value_wins, index_wins) in _WINS.items():
            parts.append(
                _TILES.replace("VALUE_WINS", value_wins)
                .replace("INDEX_WINS", index_wins)
                .replace("VARIANT", variant)
            )
        parts.append(_DRIVER)
        parts.append(_KBEST)
        parts.append(_DRAW)
        parts.append(_CERTIFY)
        parts[-4 - len(_WINS) :] = [
            p.replace("NAME", name).replace("IDX", idx).replace("SCALAR", t)
            for p in parts[-4 - len(_WINS) :]
        ]
    parts.append(_WALK)
    parts += [_COPY.replace("WIDTH", w) for w in ("32", "64")]
    parts.append(_UNRAVEL)
    parts.append(_FINITE)
    return "\n".join(parts)


SOURCE = _source()
"""The kernels' C source (what is built and hashed)."""

FLAGS: tuple[str, ...] = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",  # (where the CPU has AVX-512: measured 1.2-2x faster)
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-std=c99",
)

# Fewest terms for which a call is split over threads (the fork costs microseconds).
PARALLEL_MIN_TERMS = 1 << 16

DTYPES = (torch.float32, torch.float64)
"""The dtypes the kernel is built for."""

ARGMAX_MAX = {torch.float32: 2**31 - 1, torch.float64: 2**63 - 1}
"""The most terms a step's argmax may count, per dtype: the float32 tiles keep it as an
int32 (a step with more runs on the torch kernels)."""

_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9 + [ctypes.c_int]
_VJP_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
_RANKED_ARGTYPES = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 15 + [ctypes.c_int]
_KBEST_ARGTYPES = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 25 + [ctypes.c_int]
_COPY_ARGTYPES = [ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int]
_UNRAVEL_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2
_UNRAVEL_ARGTYPES += [ctypes.c_int] * 2
_FINITE_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64]
_CERTIFY_ARGTYPES: list[Any] = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 4
_CERTIFY_ARGTYPES += [ctypes.c_double]
_DRAW_ARGTYPES = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5 + [ctypes.c_double, ctypes.c_int]


@dataclass(frozen=True)
class _Library:
    forward: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    vjp: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    ranked: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    kbest: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    draw: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    copy: dict[int, ctypes._CFuncPtr]  # type: ignore[name-defined]  # by element size
    unravel: ctypes._CFuncPtr  # type: ignore[name-defined]
    all_finite: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    certified_dead: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    path: Path


_STATUS: dict[str, str] = {}


def _cache_dir() -> Path:
    """``$SEMIRING_EINSUM_CACHE``, else ``semiring_einsum`` in the user's cache directory."""
    chosen = os.environ.get("SEMIRING_EINSUM_CACHE")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "semiring_einsum"
    try:
        return Path.home() / ".cache" / "semiring_einsum"
    except RuntimeError:  # no home directory (a container's anonymous user)
        return Path(tempfile.gettempdir()) / f"semiring_einsum-{os.getuid()}"


def _unsafe(directory: Path) -> str | None:
    """Why a library in ``directory`` may not be trusted, or ``None``: it must be a real
    directory (not a link) owned by this user, which no other user may write to -- else
    another local user could plant a library that we load.  Made (mode 0700) if missing;
    ``OSError`` where it cannot be."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = os.lstat(directory)
    if not stat.S_ISDIR(found.st_mode):
        return f"{directory} is not a directory (a link?)"
    if found.st_uid != os.getuid():
        return f"{directory} is owned by uid {found.st_uid}, not by this user ({os.getuid()})"
    if found.st_mode & 0o022:
        return f"{directory} is writable by other users (mode {stat.S_IMODE(found.st_mode):o})"
    return None


_PRIVATE: list[Path] = []  # this process's private build directory, once made


def _private_dir() -> Path:
    """A private temporary directory for this process's build (removed at exit)."""
    if not _PRIVATE:
        made = Path(tempfile.mkdtemp(prefix="semiring_einsum-"))  # (mode 0700, ours)
        atexit.register(shutil.rmtree, made, True)
        _PRIVATE.append(made)
    return _PRIVATE[0]


def _cpu() -> str:
    """What ``-march=native`` depends on, as the kernel reports the CPU: model and flags
    (x86), implementer, part and features (ARM; no "model name" or "flags" there)."""
    keys = (
        *("model name", "flags", "Features", "CPU implementer", "CPU architecture"),
        *("CPU variant", "CPU part", "CPU revision", "cpu model", "isa"),
    )
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(keys)]
        return "\n".join(sorted(set(lines))) or text
    except OSError:
        return platform.processor() or platform.machine()


def _target(cc: list[str]) -> str:
    """What the compiler makes of ``-march=native`` here, and its target triple: its
    version and target lines, and the machine options its compiler proper is run with
    (``-march=skylake-avx512 -mavx2 ...`` for GCC, ``-target-cpu``/``-target-feature``
    for clang), from ``cc -###`` -- without the temporary file names, which change per
    call.  The version and ``-dumpmachine`` where ``-march=native`` is refused."""
    command = [*cc, "-###", "-march=native", "-x", "c", "-c", os.devnull, "-o", os.devnull]
    found = subprocess.run(command, capture_output=True, text=True, timeout=30)
    kept: list[str] = []
    for line in found.stderr.splitlines():
        if line.startswith(("Target:", "gcc version", "clang version")) or "version" in line:
            kept.append(line.strip())
        elif "cc1" in line:
            words = shlex.split(line)
            for before, word in zip([""] + words, words):
                if word.startswith("-m") or before in ("-target-cpu", "-target-feature", "-triple"):
                    kept.append(word)
    if found.returncode == 0 and kept:
        return "\n".join(kept)
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    machine = subprocess.run([*cc, "-dumpmachine"], capture_output=True, text=True, timeout=30)
    return version.stdout + machine.stdout


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (which may carry arguments, ``ccache gcc``), else
    the first of ``cc``, ``gcc``, ``clang`` on the ``PATH``."""
    given = shlex.split(os.environ.get("CC", ""))
    if given and shutil.which(given[0]):
        return [shutil.which(given[0]) or given[0], *given[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _flag_sets() -> list[tuple[str, ...]]:
    """:data:`FLAGS`, then ever more portable sets, for compilers that refuse some of them
    (no ``-mprefer-vector-width``, no ``-march=native``, no OpenMP: one thread)."""
    drop = ("-mprefer-vector-width=512", "-march=native", "-fopenmp")
    sets = [FLAGS]
    for k in range(1, len(drop) + 1):
        sets.append(tuple(f for f in FLAGS if f not in drop[:k]))
    return sets


def _build(cc: list[str], target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically: a temporary file, then a rename),
    with the first of :func:`_flag_sets` the compiler accepts."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "tropical.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        sets = _flag_sets()
        for k, flags in enumerate(sets):
            try:
                subprocess.run(
                    [*cc, *flags, str(src), "-o", str(out), "-lm"],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                break
            except subprocess.CalledProcessError:
                if k == len(sets) - 1:
                    raise
        os.replace(out, target)
        _STATUS["built"] = str(target)


def _built(cc: list[str], target: Path) -> _Library:
    """The library at ``target``, built first where it is missing or damaged.  Under an
    exclusive lock on ``<target>.lock``: of N processes starting at once, one builds and
    the others load its file."""
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
        if not target.exists():
            _build(cc, target)
        _trusted(target)
        try:
            return _load(target)
        except (OSError, AttributeError):  # a damaged cached file: build it anew, once
            _build(cc, target)
            return _load(target)


def _trusted(target: Path) -> None:
    """Refuse a library file that another user owns or may write to (``PermissionError``)."""
    found = os.lstat(target)
    if found.st_uid != os.getuid() or found.st_mode & 0o022 or not stat.S_ISREG(found.st_mode):
        raise PermissionError(f"{target} is not a regular file of this user's only")


def _warn_once(message: str) -> None:
    if "warned" not in _STATUS:
        _STATUS["warned"] = message
        warnings.warn(f"semiring_einsum's native kernel: {message}", RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=1)
def library() -> _Library | None:
    """The loaded kernel library, built on first use; ``None`` where it is unavailable.

    The build goes to the cache directory (see docs/performance.md) if it is safe (ours,
    writable by us alone) and writable; else, with one warning, to a private temporary
    directory of this process."""
    if os.environ.get("SEMIRING_EINSUM_NATIVE", "1") == "0":
        _STATUS["reason"] = "disabled by SEMIRING_EINSUM_NATIVE=0"
        return None
    if not sys.platform.startswith("linux"):
        _STATUS["reason"] = f"not built on {sys.platform} (Linux only)"
        return None
    cc = _compiler()
    if cc is None:
        _STATUS["reason"] = "no C compiler found (cc, gcc, clang or $CC)"
        return None
    try:
        key = hashlib.sha256(
            "\0".join([SOURCE, " ".join(FLAGS), *cc, _target(cc), _cpu()]).encode()
        ).hexdigest()[:20]
        name = f"tropical-{key}.so"
        cache = _cache_dir()
        target = cache / name
        lib: _Library | None = None
        try:
            why = _unsafe(cache)
            if why is None:
                lib = _built(cc, target)
        except OSError as exc:  # read-only, or no permission
            why = f"cannot build in {cache} ({exc})"
        if lib is None:
            _warn_once(f"{why}; building in a private temporary directory instead")
            target = _private_dir() / name
            lib = _built(cc, target)
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        _STATUS["reason"] = f"build or load failed: {detail.strip()[:500]}"
        return None
    _STATUS["reason"] = f"loaded {target}"
    return lib


def expected() -> bool:
    """Whether max-plus steps will run on the library, without building it (what plans
    read: planning never starts a compiler).  Once :func:`library` has been tried, its
    answer; before, whether it can be tried (not disabled, Linux, a compiler found).
    Where that first build then fails, the steps planned on it run the torch kernels."""
    if library.cache_info().currsize:
        return library() is not None
    return (
        os.environ.get("SEMIRING_EINSUM_NATIVE", "1") != "0"
        and sys.platform.startswith("linux")
        and _compiler() is not None
    )


def _load(target: Path) -> _Library:
    lib = ctypes.CDLL(str(target))
    forward, vjp, ranked, kbest, draw = {}, {}, {}, {}, {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        forward[dtype] = _bind(lib, f"maxplus_{suffix}", _ARGTYPES)
        vjp[dtype] = _bind(lib, f"maxplus_{suffix}_vjp", _VJP_ARGTYPES)
        ranked[dtype] = _bind(lib, f"maxplus_{suffix}_ranked", _RANKED_ARGTYPES)
        kbest[dtype] = _bind(lib, f"maxplus_{suffix}_kbest", _KBEST_ARGTYPES)
        draw[dtype] = _bind(lib, f"maxplus_{suffix}_draw", _DRAW_ARGTYPES)
    copy = {w // 8: _bind(lib, f"copy_{w}", _COPY_ARGTYPES) for w in (32, 64)}
    unravel = _bind(lib, "unravel_64", _UNRAVEL_ARGTYPES)
    unravel.restype = ctypes.c_int  # nonzero: no memory for its table
    all_finite, certified = {}, {}
    for dtype, width in ((torch.float32, 32), (torch.float64, 64)):
        all_finite[dtype] = _bind(lib, f"all_finite_{width}", _FINITE_ARGTYPES)
        all_finite[dtype].restype = ctypes.c_int
        name = f"maxplus_f{width}_certified_dead"
        certified[dtype] = _bind(lib, name, _CERTIFY_ARGTYPES)
        certified[dtype].restype = ctypes.c_int
    return _Library(forward, vjp, ranked, kbest, draw, copy, unravel, all_finite, certified, target)


def _bind(lib: ctypes.CDLL, name: str, argtypes: list[Any]) -> Any:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = None
    return fn


def status() -> str:
    """Whether the native kernel is in use, and why not if it is not."""
    lib = library()
    return ("native: " if lib is not None else "pure torch: ") + _STATUS.get("reason", "")


def cache_clear() -> None:
    """Forget the step layouts and the loaded library (the next call loads it anew)."""
    layout.cache_clear()
    library.cache_clear()
    _rank_share_of.cache_clear()
    _STATUS.clear()


def _mergeable(shape: Sequence[int], strides: Sequence[int], groups: Sequence[str]) -> bool:
    """Whether each group's dims (consecutive, in ``groups``' order) view as one dim.

    The test ``view`` makes (size-1 dims aside), without the cost of its error."""
    d = 0
    for g in groups:
        outer = None  # the stride one dim out must have
        for _ in g:
            size, stride = shape[d], strides[d]
            d += 1
            if size == 1:
                continue
            if outer is not None and outer != stride * size:
                return False
            outer = stride
    return True


# Fewest elements for which :func:`dense` copies on the native library: below, the
# call's fixed cost (its argument arrays, the offset table) loses to torch's copy (the
# stack RNN's REPL operand, 10k elements: 16 against 10 us).
_COPY_MIN = 1 << 15


def _innermost(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Elements of the longest run of trailing dims that memory walks as one strided dim."""
    inner, step = 1, 0
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size == 1:
            continue
        if inner > 1 and stride != step * inner:
            break
        if inner == 1:
            step = stride
        inner *= size
    return inner


# The native loop copies views whose innermost run is shorter than this; torch's copy is
# as fast or faster from there (blocked transposes: a 512 x 512 one 3x faster).  On the
# stack RNN's POP operand (a run of 6): 1.4x faster than torch's.
_COPY_INNER_MAX = 16


def dense(x: Tensor) -> Tensor:
    """``x`` in contiguous memory: ``x`` itself where it is, else a copy (made by the native
    library's loop where it loads, may read ``x``, and the view's innermost run is short;
    see :data:`_COPY`)."""
    if x.is_contiguous():
        return x
    lib = library()
    nd = x.dim()
    if (
        lib is None
        or x.dtype not in _COPY_DTYPES
        or x.numel() < _COPY_MIN
        or nd > 16
        or (x.requires_grad and torch.is_grad_enabled())
        or not _plain(x)
        or torch.compiler.is_compiling()
        or _innermost(x.shape, x.stride()) >= _COPY_INNER_MAX  # (a Python loop: last)
    ):
        return x.contiguous()
    return _copy(lib, x)


def _copy(lib: _Library, x: Tensor) -> Tensor:
    """A contiguous copy of ``x`` (a plain CPU tensor of one of :data:`_COPY_DTYPES`, at
    most 16 dims) by the native loop."""
    out = torch.empty(x.shape, dtype=x.dtype)
    nd = x.dim()
    lib.copy[x.element_size()](
        x.data_ptr(),
        out.data_ptr(),
        nd,
        (ctypes.c_int64 * nd)(*x.shape),
        (ctypes.c_int64 * nd)(*x.stride()),
        torch.get_num_threads() if x.numel() >= PARALLEL_MIN_TERMS else 1,
    )
    return out


_COPY_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


@dataclass(frozen=True)
class Operand:
    """How one operand becomes its 3-d grouped view (see :class:`Layout`)."""

    term: str  # its indices
    groups: tuple[str, str, str]
    perm: tuple[int, ...] | None  # to group order; None: already in it
    full: tuple[int, ...]  # its full (unbroadcast) sizes in group order
    shape: tuple[int, int, int]  # one dim per group
    dims: tuple[int | None, int | None, int | None] | None  # per group: its one dim, if so

    def strides(self, x: Tensor) -> tuple[int, int, int] | None:
        """The grouped view's strides read off ``x`` itself where every group is at most
        one index (the common case: no view to make); ``None`` otherwise."""
        if self.dims is None:
            return None
        st, sh = x.stride(), x.shape
        d0, d1, d2 = self.dims
        return (
            0 if d0 is None or sh[d0] == 1 else st[d0],
            0 if d1 is None or sh[d1] == 1 else st[d1],
            0 if d2 is None or sh[d2] == 1 else st[d2],
        )

    def grouped(self, x: Tensor) -> Tensor:
        """``x`` as one dim per group: a view where it can be, else a copy."""
        if self.perm is not None:
            x = x.permute(self.perm)
        if x.shape != self.full:  # size-1 (broadcast) dims
            x = x.expand(self.full)
        if not x.numel() or _mergeable(x.shape, x.stride(), self.groups):
            return x.view(self.shape)
        return dense(x).view(self.shape)

    def ungrouped(self, grad: Tensor, like: Tensor) -> Tensor:
        """A gradient in grouped form, in the layout and shape of the operand ``like``."""
        order = "".join(self.groups)
        grad = grad.view(self.full).permute([order.index(c) for c in self.term])
        lacking = tuple(d for d, (n, f) in enumerate(zip(like.shape, grad.shape)) if n != f)
        return grad.sum(lacking, keepdim=True) if lacking else grad


@dataclass(frozen=True)
class Layout:
    """A two-operand step as ``c[batch, rows, cols] = max_sum a[batch, rows, sum] + b[...]``.

    The groups are strings of the step's indices: ``batch`` in both operands and the
    output, ``rows`` only in the left operand, ``cols`` only in the right one,
    ``summed`` in both and summed (in the step's row-major order of summed indices,
    so the kernel's linear argmax is the step's).  The left operand is the step's
    second one when ``swap`` (the output then needs no permute).
    """

    swap: bool
    a: Operand
    b: Operand
    out_shape: tuple[int, ...]  # batch + rows + cols sizes
    out_order: tuple[int, ...] | None  # permutes that into the step's output; None: as is
    back_order: tuple[int, ...] | None  # the inverse
    dims: tuple[int, int, int, int]  # nb, m, k, n
    threads: bool  # enough terms to split over threads


# Fewer columns than this (with more rows) are laid out as rows instead.
_NARROW_COLUMNS = 16


@functools.lru_cache(maxsize=4096)
def layout(step: Step) -> Layout | None:
    """The matrix-product form of ``step``, or ``None`` where the kernel does not apply."""
    if len(step.inputs) != 2 or not step.windows:
        return None
    ta, tb = step.inputs
    summed = "".join(c for c, _ in step.windows)
    out = step.output
    if any(c not in ta or c not in tb for c in summed):
        return None
    if len(set(ta)) != len(ta) or len(set(tb)) != len(tb):
        return None
    batch = "".join(c for c in out if c in ta and c in tb)
    rows = "".join(c for c in out if c in ta and c not in tb)
    cols = "".join(c for c in out if c in tb and c not in ta)
    size = step.size
    # Rows from the operand whose own indices lead the output (no output permute then),
    # unless the columns would be too few to fill the vector loop over a tile's columns
    # (the stack RNN's POP step: 2 columns against 6t rows; 2.6 -> 1.0 ms at t=30).
    # Then the wider group becomes the columns, and the output is permuted afterwards.
    swap = False
    order = batch + rows + cols
    m_size = math.prod(size[c] for c in rows)
    n_size = math.prod(size[c] for c in cols)
    narrow = n_size < _NARROW_COLUMNS and m_size > n_size
    if (order != out and batch + cols + rows == out) or narrow:
        swap, rows, cols, ta, tb = True, cols, rows, tb, ta
        order = batch + rows + cols
    a = _operand(ta, (batch, rows, summed), size)
    b = _operand(tb, (batch, summed, cols), size)
    out_order = tuple(order.index(c) for c in out)
    back = [0] * len(out_order)
    for d, p in enumerate(out_order):
        back[p] = d
    identity = out_order == tuple(range(len(out)))
    nb, m, k = a.shape
    n = b.shape[2]
    return Layout(
        swap,
        a,
        b,
        tuple(size[c] for c in order),
        None if identity else out_order,
        None if identity else tuple(back),
        (nb, m, k, n),
        nb * m * k * n >= PARALLEL_MIN_TERMS,
    )


def _operand(term: str, groups: tuple[str, str, str], size: dict[str, int]) -> Operand:
    perm = tuple(term.index(c) for g in groups for c in g)
    full = tuple(size[c] for g in groups for c in g)
    shape = tuple(math.prod(size[c] for c in g) for g in groups)
    dims = None
    if all(len(g) <= 1 for g in groups):
        dims = tuple(term.index(g) if g else None for g in groups)
    return Operand(
        term,
        groups,
        None if perm == tuple(range(len(term))) else perm,
        full,
        shape,  # type: ignore[arg-type]
        dims,  # type: ignore[arg-type]
    )


def max_plus(
    step: Step, xs: list[Tensor], argmax: bool, index_view: bool = False
) -> tuple[Tensor, Tensor | None] | None:
    """Values and, if asked, the linear argmax of a max-plus step (``None`` where the
    kernel does not apply).

    With ``index_view``, the argmax may be a permuted view (of a contiguous tensor): for
    plain eager callers, which read it once (:func:`unravel` walks it as it is, the
    vjp permutes it back); the operator's kernel returns it contiguous, as its fake
    does."""
    lib = library()
    lay = layout(step)
    if lib is None or lay is None:
        return None
    a, b = xs
    dtype = a.dtype
    if b.dtype != dtype or dtype not in DTYPES or not (a.is_cpu and b.is_cpu):
        return None
    if lay.swap:
        a, b = b, a
    nb, m, k, n = lay.dims
    if argmax and k > ARGMAX_MAX[dtype]:
        return None  # (the float32 tiles keep their argmax as int32: the torch kernels')
    found_a = lay.a.strides(a)
    if found_a is None:
        a = lay.a.grouped(a)
        found_a = (a.stride(0), a.stride(1), a.stride(2))
    found_b = lay.b.strides(b)
    if found_b is None or (found_b[2] != 1 and n > 1):  # columns are read contiguously
        b = lay.b.grouped(b)
        if b.stride(2) != 1 and n > 1:
            b = dense(b)
        found_b = (b.stride(0), b.stride(1), b.stride(2))
    sa, sb = found_a, found_b
    # Allocated in the output's own shape (not a view of a 3-d buffer: autograd
    # forbids in-place changes to views made inside a Function).
    values = torch.empty(lay.out_shape, dtype=dtype)
    index = torch.empty(lay.out_shape, dtype=torch.int64) if argmax else None
    if nb and m and n:
        lib.forward[dtype](
            a.data_ptr(),
            b.data_ptr(),
            values.data_ptr(),
            index.data_ptr() if index is not None else None,
            nb,
            m,
            k,
            n,
            sa[0],
            sa[1],
            sa[2],
            sb[0],
            sb[1],
            torch.get_num_threads() if lay.threads else 1,
        )
    if lay.out_order is not None:
        values = dense(values.permute(lay.out_order))
        if index is not None:
            index = index.permute(lay.out_order)
            index = index if index_view else dense(index)
    return values, index


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite (no inf, no NaN).

    One native pass over a plain contiguous CPU float32/float64 tensor (the check
    after a pairwise Viterbi plan: a reduction and a read-back in torch cost 3x more
    on small outputs); torch elsewhere."""
    lib = library()
    if lib is None or x.dtype not in DTYPES or not x.is_contiguous() or not _plain(x):
        return math.isfinite(x.detach().sum()) if x.numel() else True
    return bool(lib.all_finite[x.dtype](x.data_ptr(), x.numel()))


def certified_dead(log_sum: Tensor, ma: Tensor, mb: Tensor, bound: float) -> bool | None:
    """Whether every cell of ``log_sum`` is ``>= bound`` (NaN is not) or dead, its row
    maxima ``ma + mb`` (which broadcast to it) summing to -inf: one native walk (see
    :mod:`._logblas`).  ``None`` where it does not run (no library, another dtype, a
    traced or wrapped tensor, more than 16 dims)."""
    lib = library()
    dtype = log_sum.dtype
    nd = log_sum.dim()
    if (
        lib is None
        or dtype not in DTYPES
        or ma.dtype != dtype
        or mb.dtype != dtype
        or nd > 16
        or not (_plain(log_sum) and _plain(ma) and _plain(mb))
    ):
        return None
    shape = log_sum.shape
    ma, mb = ma.expand(shape), mb.expand(shape)
    ints = ctypes.c_int64 * nd
    return bool(
        lib.certified_dead[dtype](
            log_sum.data_ptr(),
            ma.data_ptr(),
            mb.data_ptr(),
            nd,
            ints(*shape),
            ints(*log_sum.stride()),
            ints(*ma.stride()),
            ints(*mb.stride()),
            bound,
        )
    )


def unravel(step: Step, linear: Tensor) -> Tensor | None:
    """:func:`._kernels.unravel` of a step with a coordinate table, by the native loop:
    one pass over ``linear`` in any layout (a permuted argmax: no copy first), a lookup
    per cell.  ``None`` where it does not apply (no library, a traced or wrapped
    tensor, no table)."""
    lib = library()
    if (
        lib is None
        or not K.small_terms(step)
        or linear.dtype != torch.int64
        or linear.dim() > 16
        or not _plain(linear)
        or not untraced()
    ):
        return None
    table = K.coordinates(step, linear.device)
    nw = table.shape[1]
    out = torch.empty((*linear.shape, nw), dtype=torch.int64)
    nd = linear.dim()
    failed = lib.unravel(
        linear.data_ptr(),
        table.data_ptr(),
        out.data_ptr(),
        nd,
        (ctypes.c_int64 * nd)(*linear.shape),
        (ctypes.c_int64 * nd)(*linear.stride()),
        nw,
        torch.get_num_threads() if linear.numel() >= PARALLEL_MIN_TERMS else 1,
    )
    return None if failed else out


def max_plus_vjp(
    step: Step, xs: list[Tensor], index: Tensor, g: Tensor, needs: list[bool]
) -> list[Tensor | None]:
    """First-order gradients of a ``tropical`` step from its argmax (not differentiable).

    Each output cell's cotangent goes to its argmax term: one pass over the cells.
    """
    lib = library()
    lay = layout(step)
    assert lib is not None and lay is not None, f"not a tropical step: {step}"
    a, b = xs
    need_a, need_b = needs
    if lay.swap:
        a, b, need_a, need_b = b, a, need_b, need_a
    nb, m, k, n = lay.dims
    dtype = a.dtype
    g = g.to(dtype).expand(K.out_shape(step))
    if lay.back_order is not None:
        g, index = g.permute(lay.back_order), index.permute(lay.back_order)
    g, index = g.contiguous(), index.contiguous()
    ga = torch.zeros((nb, m, k), dtype=dtype) if need_a else None
    gb = torch.zeros((nb, k, n), dtype=dtype) if need_b else None
    if g.numel():
        lib.vjp[dtype](
            g.data_ptr(),
            index.data_ptr(),
            ga.data_ptr() if ga is not None else None,
            gb.data_ptr() if gb is not None else None,
            nb,
            m,
            k,
            n,
            torch.get_num_threads() if lay.threads and nb > 1 else 1,
        )
    grads = [
        lay.a.ungrouped(ga, a) if ga is not None else None,
        lay.b.ungrouped(gb, b) if gb is not None else None,
    ]
    return grads[::-1] if lay.swap else grads


def _plain(x: Tensor) -> bool:
    """A tensor whose memory the kernel may read: a CPU tensor, not fake, not a transform's."""
    return type(x) is torch.Tensor and x.is_cpu and not _wrapped(x)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _rank_share(step: Step, lay: Layout, strides: Sequence[int]) -> Tensor:
    """Each linear position of the summed group's share of the global rank (``w[s]``)."""
    return _rank_share_of(step, lay.a.groups[2], tuple(strides))


@functools.lru_cache(maxsize=1024)
def _rank_share_of(step: Step, summed: str, strides: tuple[int, ...]) -> Tensor:
    # Cached: the kernels only read it, and it is a plain CPU tensor (the native
    # kernel never runs under a tracer).
    size = step.size
    share = torch.zeros(1, dtype=torch.int64)
    for c, stride in zip(summed, strides):  # the summed group, in the step's order
        share = (share[:, None] + torch.arange(size[c]) * stride).reshape(-1)
    return share


def max_plus_ranked(
    step: Step, xs: Sequence[Tensor], ranks: Sequence[Tensor | None], strides: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`._kernels.max_ranked` on the native kernel, or ``None`` where it does not apply
    (no library, not a matrix-shaped step, other dtypes, tensors it may not read)."""
    lib = library()
    lay = layout(step)
    if lib is None or lay is None or torch.compiler.is_compiling():
        return None
    a, b = xs
    ra, rb = ranks
    dtype = a.dtype
    if b.dtype != dtype or dtype not in DTYPES:
        return None
    if not all(_plain(x) for x in (a, b, *(r for r in ranks if r is not None))):
        return None
    if lay.swap:
        a, b, ra, rb = b, a, rb, ra
    nb, m, k, n = lay.dims
    ga, gb = lay.a.grouped(a), lay.b.grouped(b)
    if gb.stride(2) != 1 and n > 1:  # the values' columns are read contiguously
        gb = dense(gb)
    gra = lay.a.grouped(ra) if ra is not None else None
    grb = lay.b.grouped(rb) if rb is not None else None
    share = _rank_share(step, lay, strides)
    values = torch.empty(lay.out_shape, dtype=dtype)
    index = torch.empty(lay.out_shape, dtype=torch.int64)
    rank = torch.empty(lay.out_shape, dtype=torch.int64)
    if nb and m and n:
        zero = (0, 0, 0)
        sra = gra.stride() if gra is not None else zero
        srb = grb.stride() if grb is not None else zero
        lib.ranked[dtype](
            ga.data_ptr(),
            gb.data_ptr(),
            gra.data_ptr() if gra is not None else None,
            grb.data_ptr() if grb is not None else None,
            share.data_ptr(),
            values.data_ptr(),
            index.data_ptr(),
            rank.data_ptr(),
            nb,
            m,
            k,
            n,
            ga.stride(0),
            ga.stride(1),
            ga.stride(2),
            gb.stride(0),
            gb.stride(1),
            sra[0],
            sra[1],
            sra[2],
            srb[0],
            srb[1],
            srb[2],
            torch.get_num_threads() if lay.threads else 1,
        )
    if lay.out_order is not None:
        values, index, rank = (dense(t.permute(lay.out_order)) for t in (values, index, rank))
    return values, index, rank


def kbest(
    step: Step,
    xs: Sequence[Tensor],
    ranks: Sequence[Tensor | None],
    k: int,
    strides: Sequence[int],
    pad: int,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The ``k`` best terms of each cell of a matrix-shaped step on the native kernel.

    ``xs[i]`` is the operand's values, with a trailing dim of ``k`` slots where
    ``ranks[i]`` (its lists' partial ranks, same shape) is given; ``strides``:
    the global row-major stride of each summed index (in the step's order).  Returns
    ``(values, ranks, ids)``, each of shape ``step output + (k,)`` (see
    :func:`._structured._kbest_step` for the id), or ``None`` where the kernel does
    not apply (no library, not a matrix-shaped step, other dtypes, tensors it may not
    read).  Empty slots are ``(-inf, pad, -1)``.
    """
    lib = library()
    lay = layout(step)
    if lib is None or lay is None or torch.compiler.is_compiling():
        return None
    dtype = xs[0].dtype
    if any(x.dtype != dtype for x in xs) or dtype not in DTYPES:
        return None
    if not all(_plain(x) for x in (*xs, *(r for r in ranks if r is not None))):
        return None
    slots = [k if r is not None else 1 for r in ranks]
    # A candidate's slot number is row-major over the step's lists in operand order.
    mul = [slots[1], 1]
    a, b, ra, rb = xs[0], xs[1], ranks[0], ranks[1]
    ka, kb, ma, mb = slots[0], slots[1], mul[0], mul[1]
    if lay.swap:
        a, b, ra, rb, ka, kb, ma, mb = b, a, rb, ra, kb, ka, mb, ma
    nb, m, kk, n = lay.dims

    def grouped(op: Operand, x: Tensor, lists: bool, at: int) -> Tensor:
        """The grouped view with the slot dim at ``at`` (3: a's last; 2: b's, before columns)."""
        if not lists:
            return op.grouped(x).unsqueeze(at)
        perm = op.perm if op.perm is not None else tuple(range(len(op.term)))
        y = x.permute(*perm, x.dim() - 1).expand(*op.full, k).reshape(*op.shape, k)
        return y if at == 3 else y.permute(0, 1, 3, 2)

    ga = grouped(lay.a, a, ra is not None, 3)
    gb = grouped(lay.b, b, rb is not None, 2).contiguous()
    gra = grouped(lay.a, ra, True, 3) if ra is not None else None
    grb = grouped(lay.b, rb, True, 2).contiguous() if rb is not None else None
    share = _rank_share(step, lay, strides)
    # Each row visits its sums from its best term of ``a`` down, where there are enough
    # of them for the order to matter.
    visit = None
    if kk > 2 * k:
        best_a = ga[..., 0].contiguous()  # (nb, m, kk): a list operand by its best slot
        # (Any order is exact: ties among equal values are settled by rank in the lists.)
        visit = best_a.argsort(dim=2, descending=True).contiguous()
    values = torch.empty(lay.out_shape + (k,), dtype=dtype)
    rank = torch.empty(lay.out_shape + (k,), dtype=torch.int64)
    ids = torch.empty(lay.out_shape + (k,), dtype=torch.int64)
    if nb and m and n:
        sra = gra.stride() if gra is not None else (0, 0, 0, 0)
        srb = grb.stride() if grb is not None else (0, 0, 0, 0)
        lib.kbest[dtype](
            ga.data_ptr(),
            gb.data_ptr(),
            gra.data_ptr() if gra is not None else None,
            grb.data_ptr() if grb is not None else None,
            share.data_ptr(),
            visit.data_ptr() if visit is not None else None,
            values.data_ptr(),
            rank.data_ptr(),
            ids.data_ptr(),
            nb,
            m,
            kk,
            n,
            ka,
            kb,
            k,
            *ga.stride(),
            gb.stride(0),
            gb.stride(1),
            gb.stride(2),
            *sra,
            srb[0],
            srb[1],
            srb[2],
            ka * kb,
            ma,
            mb,
            pad,
            torch.get_num_threads() if lay.threads else 1,
        )
    if lay.out_order is not None:
        order = (*lay.out_order, len(lay.out_order))
        values, rank, ids = (dense(t.permute(order)) for t in (values, rank, ids))
    return values, rank, ids


def draw_blocks(
    sums: Tensor,
    pa: Tensor,
    pb: Tensor,
    cells: tuple[Tensor, Tensor, Tensor],
    u: Tensor,
    shape: tuple[int, int, int, int],
    safe: float,
) -> Tensor | None:
    """The block sampler's per-row draws on the native kernel (see ``_sample._draw_blocks``):
    ``sums`` ``(nb, m, n, nblk)``, ``pa`` ``(nb, m, nblk, width)``, ``pb`` ``(nb, n, nblk,
    width)``, each row's cell ``(t, i, j)`` and two uniforms; ``shape`` is ``(m, n, nblk,
    width)``.  Returns the drawn summed position per row (-1 for rows the caller must draw
    exactly), or ``None`` where the kernel is not available."""
    lib = library()
    dtype = sums.dtype
    tensors = (sums, pa, pb, *cells, u)
    if lib is None or dtype not in DTYPES or torch.compiler.is_compiling():
        return None
    if not all(_plain(x) for x in tensors):
        return None
    sums, pa, pb, u = (x.contiguous() for x in (sums, pa, pb, u))
    t, i, j = (x.contiguous() for x in cells)
    rows = u.shape[0]
    out = torch.empty(rows, dtype=torch.int64)
    m, n, nblk, width = shape
    lib.draw[dtype](
        sums.data_ptr(),
        pa.data_ptr(),
        pb.data_ptr(),
        t.data_ptr(),
        i.data_ptr(),
        j.data_ptr(),
        u.data_ptr(),
        out.data_ptr(),
        rows,
        m,
        n,
        nblk,
        width,
        safe,
        torch.get_num_threads() if rows >= 4096 else 1,
    )
    return out
