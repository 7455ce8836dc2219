/* One tile of the max-plus product: rows x cols cells, each the max over s < k of
   a[r, s] + b[s, j].  best and arg live in the tile's arrays (in L1) while s runs; a later
   s wins only on a strictly larger value, or ("nan" variant) with the first NaN (v != v)
   over a cell that is not NaN yet.  The "clean" variant, for operands where no term can be
   NaN, skips those tests.

   A template: included by maxplus.h once per variant, with VARIANT (nan, clean) and its
   tests VALUE_WINS and INDEX_WINS defined, inside maxplus.h's SCALAR, IDX and PREFIX. */

static inline __attribute__((always_inline)) void FN(CAT(_values_, VARIANT))(
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

static inline __attribute__((always_inline)) void FN(CAT(_indexed_, VARIANT))(
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
