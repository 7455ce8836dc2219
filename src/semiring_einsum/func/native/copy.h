/* A strided view copied into contiguous memory (what ``reshape`` of a permuted operand and
   ``contiguous`` do; torch's loop runs 1.5x slower on copies whose innermost dims are a
   few elements long, like the stack RNN's POP operand).  Elements move as integers of
   their width.

   A template: included by tropical.c once per WIDTH (32, 64), with UINT its integer type. */

void CAT(copy_, WIDTH)(const UINT* src, UINT* dst, int nd, const int64_t* sizes,
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
            const UINT* sp = src + walk_base(&w, o);
            UINT* dp = dst + o * inner;
            for (int64_t j = 0; j < inner; j++) dp[j] = sp[off[j]];
        }
    } else {
        #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
        for (int64_t o = 0; o < w.outer; o++) {
            const UINT* sp = src + walk_base(&w, o);
            UINT* dp = dst + o * inner;
            for (int64_t j = 0; j < inner; j++) dp[j] = sp[j * last];
        }
    }
    free(w.off);
}
