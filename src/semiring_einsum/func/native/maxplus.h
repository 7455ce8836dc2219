/* The max-plus kernels of one dtype: the tiles (NaN-aware and clean), the driver and the
   vjp, the ranked (pairwise Viterbi) and k-best loops, the sampler's draw, and the log BLAS
   route's certificate with dead cells.

   A template: included by tropical.c once per dtype, with SCALAR (the element type), IDX
   (the tiles' argmax type: int32_t for float, whose tiles hold more of them) and PREFIX
   (the functions' name prefix, maxplus_f32 or maxplus_f64) defined. */

#define VARIANT nan
#define VALUE_WINS (v > bb[j]) | (v != v)
#define INDEX_WINS (v > o) | ((v != v) & (o == o))
#include "tiles.h"
#undef VARIANT
#undef VALUE_WINS
#undef INDEX_WINS

#define VARIANT clean
#define VALUE_WINS v > bb[j]
#define INDEX_WINS v > o
#include "tiles.h"
#undef VARIANT
#undef VALUE_WINS
#undef INDEX_WINS

/* Work item w of the output's tiles (row tiles fastest, so a thread's items share the
   right operand's columns): its batch, first row and column, and extents. */
static inline void FN(_tile)(int64_t w, int64_t mt, int64_t nt, int64_t m, int64_t n,
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
static inline __attribute__((always_inline)) void FN(_run)(
    const SCALAR* a, const SCALAR* b, SCALAR* c, int64_t* idx, int64_t rows, int64_t k,
    int64_t cols, int64_t sam, int64_t sak, int64_t sbk, int64_t ldc, int clean) {
    if (idx && clean)
        FN(_indexed_clean)(a, b, c, idx, rows, k, cols, sam, sak, sbk, ldc);
    else if (idx)
        FN(_indexed_nan)(a, b, c, idx, rows, k, cols, sam, sak, sbk, ldc);
    else if (clean)
        FN(_values_clean)(a, b, c, rows, k, cols, sam, sak, sbk, ldc);
    else
        FN(_values_nan)(a, b, c, rows, k, cols, sam, sak, sbk, ldc);
}

/* Which of NaN, +inf, -inf occur in x[i0, i1, i2] (strided; a 0 stride is scanned once). */
static int FN(_scan)(const SCALAR* x, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1,
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
void PREFIX(const SCALAR* a, const SCALAR* b, SCALAR* c, int64_t* idx, int64_t nb, int64_t m,
          int64_t k, int64_t n, int64_t sab, int64_t sam, int64_t sak, int64_t sbb,
          int64_t sbk, int nthreads) {
    const int fa = FN(_scan)(a, nb, m, k, sab, sam, sak);
    const int fb = FN(_scan)(b, nb, k, n, sbb, sbk, 1);
    const int clean = !((fa | fb) & 1) && !((fa & 2) && (fb & 4)) && !((fa & 4) && (fb & 2));
    const int64_t mt = (m + RB - 1) / RB, nt = (n + NB - 1) / NB;
    const int64_t total = nb * nt * mt;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t w = 0; w < total; w++) {
        int64_t bt, r0, j0, rows, cols;
        FN(_tile)(w, mt, nt, m, n, &bt, &r0, &j0, &rows, &cols);
        const SCALAR* at = a + bt * sab + r0 * sam;
        const SCALAR* btile = b + bt * sbb + j0;
        const int64_t off = (bt * m + r0) * n + j0;
        int64_t* it = idx ? idx + off : 0;
        if (rows == RB && cols == NB)  /* a full tile: the loops with constant bounds */
            FN(_run)(at, btile, c + off, it, RB, k, NB, sam, sak, sbk, n, clean);
        else
            FN(_run)(at, btile, c + off, it, rows, k, cols, sam, sak, sbk, n, clean);
    }
}

/* Ranked: ties (and NaN against NaN) go to the smallest rank ra[bt, i, s] + rb[bt, s, j] +
   w[s] (ra, rb strided, either may be NULL: 0); writes the values, the argmax s and the
   winner's rank.  A cell starts at -inf with no rank, so the first term always enters. */
void FN(_ranked)(const SCALAR* a, const SCALAR* b, const int64_t* ra, const int64_t* rb,
                 const int64_t* w, SCALAR* c, int64_t* idx, int64_t* rout, int64_t nb,
                 int64_t m, int64_t k, int64_t n, int64_t sab, int64_t sam, int64_t sak,
                 int64_t sbb, int64_t sbk, int64_t rsab, int64_t rsam, int64_t rsak,
                 int64_t rsbb, int64_t rsbk, int64_t rsbn, int nthreads) {
    const int64_t mt = (m + RB - 1) / RB, nt = (n + NB - 1) / NB;
    const int64_t total = nb * nt * mt;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t wi = 0; wi < total; wi++) {
        int64_t bt, r0, j0, rows, cols;
        FN(_tile)(wi, mt, nt, m, n, &bt, &r0, &j0, &rows, &cols);
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
void FN(_vjp)(const SCALAR* g, const int64_t* idx, SCALAR* ga, SCALAR* gb, int64_t nb,
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

/* k-best: per cell the k best terms, best first: NaN first (by rank), then by value
   descending, ties by rank ascending; a slot is (value, rank, id), an empty slot
   (-inf, PAD, -1).  Terms a[bt, i, s, p] + b[bt, s, q, j] with rank ra[bt, i, s, p] +
   rb[bt, s, q, j] + w[s] (ra, rb may be NULL: 0) and id s * S + p * ma + q * mb, where p
   and q run over the operands' own k-best lists (KA, KB: 1 for a plain operand).  A term
   enters a cell when it beats the cell's worst slot (rare once the lists fill up), and
   moves up by insertion.  Cells are written straight into the outputs (nb, m, n, K). */
/* Whether (v, r) beats (o, ro): NaN first (by rank), then value descending, rank ascending.
   Branch-free, so that a loop of tests vectorizes. */
static inline int FN(_beats)(SCALAR v, int64_t r, SCALAR o, int64_t ro) {
    const int vn = v != v, on = o != o, lt = r < ro;
    return (vn & (!on | lt)) | (!vn & !on & ((v > o) | ((v == o) & lt)));
}

/* Insert (v, r, id) into a cell's sorted list of K, which it beats at its last slot. */
static inline void FN(_insert)(SCALAR* lv, int64_t* lr, int64_t* li, int64_t K, SCALAR v,
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
        while (t > 0 && FN(_beats)(v, r, lv[t - 1], lr[t - 1])) {
            lv[t] = lv[t - 1]; lr[t] = lr[t - 1]; li[t] = li[t - 1];
            t--;
        }
    }
    lv[t] = v; lr[t] = r; li[t] = id;
}

void FN(_kbest)(const SCALAR* a, const SCALAR* b, const int64_t* ra, const int64_t* rb,
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
                            if (!FN(_beats)(v, rk, wvr[j], wrr[j])) break;
                            FN(_insert)(cv + off, cr + off, ci + off, K, v, rk,
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

/* Inverse-CDF draws by blocks (see ``_sample._draw_blocks``): per row, a block from its
   cell's block sums, then an entry of that block from its weights pa * pb.  -1 where the
   total is not above ``safe`` or the block's weights are all 0 (the caller draws those rows
   exactly).  A cumulative sum that rounding leaves at or below the target takes the last
   entry of positive weight, never one of weight 0. */
void FN(_draw)(const SCALAR* sums, const SCALAR* pa, const SCALAR* pb, const int64_t* t,
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

/* The log BLAS route's certificate where some cells may be all -inf: whether every cell of
   log S passes (is >= bound; NaN fails) or is dead (the sum of its operands' row maxima is
   -inf: its terms are all -inf, and log S = log 0 is its exact value).  One walk over the
   output with three sets of strides (the maxima broadcast), instead of four torch calls
   on output-sized tensors. */
int FN(_certified_dead)(const SCALAR* ls, const SCALAR* ma, const SCALAR* mb, int nd,
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
