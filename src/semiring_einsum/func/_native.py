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

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._plan import Step

Tensor = torch.Tensor

SOURCE = r"""
#include <stdint.h>
#include <math.h>

#define RB 4   /* rows of the left operand per tile */
#define NB 64  /* columns of the right operand per tile */

/* One tile: rows x cols cells, each the max over s < k of a[r, s] + b[s, j].  best and
   arg live in the tile's arrays (in L1) while s runs; a later s wins only on a strictly
   larger value, or with the first NaN (v != v) over a cell that is not NaN yet. */
#define TROPICAL(T, IDX, NAME)                                                          \
static void NAME##_values(const T* a, const T* b, T* c, int64_t rows, int64_t k,        \
                          int64_t cols, int64_t sam, int64_t sak, int64_t sbk,          \
                          int64_t ldc) {                                                \
    T best[RB][NB];                                                                     \
    for (int64_t r = 0; r < rows; r++)                                                  \
        for (int64_t j = 0; j < NB; j++) best[r][j] = -INFINITY;                        \
    for (int64_t s = 0; s < k; s++) {                                                   \
        const T* restrict brow = b + s * sbk;                                           \
        for (int64_t r = 0; r < rows; r++) {                                            \
            const T av = a[r * sam + s * sak];                                          \
            T* restrict bb = best[r];                                                   \
            for (int64_t j = 0; j < cols; j++) {                                        \
                T v = av + brow[j];                                                     \
                bb[j] = ((v > bb[j]) | (v != v)) ? v : bb[j];                           \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    for (int64_t r = 0; r < rows; r++)                                                  \
        for (int64_t j = 0; j < cols; j++) c[r * ldc + j] = best[r][j];                 \
}                                                                                       \
static void NAME##_indexed(const T* a, const T* b, T* c, int64_t* idx, int64_t rows,    \
                           int64_t k, int64_t cols, int64_t sam, int64_t sak,           \
                           int64_t sbk, int64_t ldc) {                                  \
    T best[RB][NB];                                                                     \
    IDX arg[RB][NB];                                                                    \
    for (int64_t r = 0; r < rows; r++)                                                  \
        for (int64_t j = 0; j < NB; j++) { best[r][j] = -INFINITY; arg[r][j] = 0; }     \
    for (int64_t s = 0; s < k; s++) {                                                   \
        const T* restrict brow = b + s * sbk;                                           \
        const IDX si = (IDX)s;                                                          \
        for (int64_t r = 0; r < rows; r++) {                                            \
            const T av = a[r * sam + s * sak];                                          \
            T* restrict bb = best[r];                                                   \
            IDX* restrict aa = arg[r];                                                  \
            for (int64_t j = 0; j < cols; j++) {                                        \
                T v = av + brow[j];                                                     \
                T o = bb[j];                                                            \
                int up = (v > o) | ((v != v) & (o == o));                               \
                bb[j] = up ? v : o;                                                     \
                aa[j] = up ? si : aa[j];                                                \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    for (int64_t r = 0; r < rows; r++)                                                  \
        for (int64_t j = 0; j < cols; j++) {                                            \
            c[r * ldc + j] = best[r][j];                                                \
            idx[r * ldc + j] = (int64_t)arg[r][j];                                      \
        }                                                                               \
}                                                                                       \
/* c[bt, i, j] = max_s a[bt, i, s] + b[bt, s, j] (and its first argmax s when idx is    \
   not NULL); a and b strided (b's columns contiguous), c and idx contiguous. */        \
void NAME(const T* a, const T* b, T* c, int64_t* idx, int64_t nb, int64_t m,            \
          int64_t k, int64_t n, int64_t sab, int64_t sam, int64_t sak, int64_t sbb,     \
          int64_t sbk, int nthreads) {                                                  \
    const int64_t mt = (m + RB - 1) / RB, nt = (n + NB - 1) / NB;                       \
    const int64_t total = nb * nt * mt;                                                 \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)") \
    for (int64_t w = 0; w < total; w++) {                                               \
        const int64_t rt = w % mt, jt = (w / mt) % nt, bt = w / (mt * nt);              \
        const int64_t r0 = rt * RB, j0 = jt * NB;                                       \
        const int64_t rows = m - r0 < RB ? m - r0 : RB;                                 \
        const int64_t cols = n - j0 < NB ? n - j0 : NB;                                 \
        const T* at = a + bt * sab + r0 * sam;                                          \
        const T* btile = b + bt * sbb + j0;                                             \
        const int64_t off = (bt * m + r0) * n + j0;                                     \
        if (idx)                                                                        \
            NAME##_indexed(at, btile, c + off, idx + off, rows, k, cols, sam, sak, sbk, n); \
        else                                                                            \
            NAME##_values(at, btile, c + off, rows, k, cols, sam, sak, sbk, n);         \
    }                                                                                   \
}

/* The vjp from the argmax: ga[bt, i, s] += g[bt, i, j] and gb[bt, s, j] += g[bt, i, j] at
   s = idx[bt, i, j] (ga, gb zeroed by the caller; either may be NULL).  Batches write
   disjoint parts, so they run in parallel; inside one the order is fixed (deterministic). */
#define TROPICAL_VJP(T, NAME)                                                           \
void NAME(const T* g, const int64_t* idx, T* ga, T* gb, int64_t nb, int64_t m,          \
          int64_t k, int64_t n, int nthreads) {                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)") \
    for (int64_t bt = 0; bt < nb; bt++) {                                               \
        const T* gt = g + bt * m * n;                                                   \
        const int64_t* it = idx + bt * m * n;                                           \
        T* at = ga ? ga + bt * m * k : 0;                                               \
        T* bb = gb ? gb + bt * k * n : 0;                                               \
        for (int64_t i = 0; i < m; i++)                                                 \
            for (int64_t j = 0; j < n; j++) {                                           \
                const int64_t s = it[i * n + j];                                        \
                const T v = gt[i * n + j];                                              \
                if (at) at[i * k + s] += v;                                             \
                if (bb) bb[s * n + j] += v;                                             \
            }                                                                           \
    }                                                                                   \
}

TROPICAL(float, int32_t, maxplus_f32)
TROPICAL(double, int64_t, maxplus_f64)
TROPICAL_VJP(float, maxplus_vjp_f32)
TROPICAL_VJP(double, maxplus_vjp_f64)
"""

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=c99")

# Fewest terms for which a call is split over threads (the fork costs microseconds).
PARALLEL_MIN_TERMS = 1 << 16

DTYPES = (torch.float32, torch.float64)
"""The dtypes the kernel is built for."""

_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9 + [ctypes.c_int]
_VJP_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]


@dataclass(frozen=True)
class _Library:
    forward: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    vjp: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    path: Path


_STATUS: dict[str, str] = {}


def _cache_dir() -> Path:
    """``$SEMIRING_EINSUM_CACHE``, else ``semiring_einsum`` in the user's cache directory."""
    chosen = os.environ.get("SEMIRING_EINSUM_CACHE")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "semiring_einsum"


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically: a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "tropical.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        subprocess.run(
            [cc, *FLAGS, str(src), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(out, target)


@functools.lru_cache(maxsize=1)
def library() -> _Library | None:
    """The loaded kernel library, built on first use; ``None`` where it is unavailable."""
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
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE, " ".join(FLAGS), cc, version, _cpu()]).encode()
        ).hexdigest()[:20]
        target = _cache_dir() / f"tropical-{key}.so"
        if not target.exists():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        _STATUS["reason"] = f"build or load failed: {detail.strip()[:500]}"
        return None
    forward, vjp = {}, {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        forward[dtype] = _bind(lib, f"maxplus_{suffix}", _ARGTYPES)
        vjp[dtype] = _bind(lib, f"maxplus_vjp_{suffix}", _VJP_ARGTYPES)
    _STATUS["reason"] = f"loaded {target}"
    return _Library(forward, vjp, target)


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
    _STATUS.clear()


@dataclass(frozen=True)
class Layout:
    """A two-operand step as ``c[batch, rows, cols] = max_sum a[batch, rows, sum] + b[...]``.

    Each group is a string of the step's indices: ``batch`` in both operands and the
    output, ``rows`` only in the left operand (``left``), ``cols`` only in the right one,
    ``summed`` in both and summed (in the step's row-major order of summed indices, so
    the kernel's linear argmax is the step's).
    """

    left: int
    batch: str
    rows: str
    cols: str
    summed: str
    out_order: tuple[int, ...]  # permutes (batch, rows, cols) into the step's output


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
    only_a = "".join(c for c in out if c in ta and c not in tb)
    only_b = "".join(c for c in out if c in tb and c not in ta)
    # Rows from the operand whose own indices lead the output (no output permute then).
    left = 0
    order = batch + only_a + only_b
    if order != out and batch + only_b + only_a == out:
        left, only_a, only_b = 1, only_b, only_a
        order = out
    out_order = tuple(order.index(c) for c in out)
    return Layout(left, batch, only_a, only_b, summed, out_order)


def _grouped(x: Tensor, term: str, groups: tuple[str, ...], size: dict[str, int]) -> Tensor:
    """``x`` (indexed by ``term``) as one dim per group (a view where it can be)."""
    x = x.permute([term.index(c) for g in groups for c in g])
    full = [size[c] for g in groups for c in g]
    if list(x.shape) != full:  # size-1 (broadcast) dims
        x = x.expand(full)
    shape = [_prod(size[c] for c in g) for g in groups]
    try:
        return x.view(shape)
    except RuntimeError:
        return x.reshape(shape)


def _prod(xs: object) -> int:
    out = 1
    for v in xs:  # type: ignore[attr-defined]
        out *= v
    return out


def max_plus(step: Step, xs: list[Tensor], argmax: bool) -> tuple[Tensor, Tensor] | None:
    """Values (and the linear argmax) of a max-plus step, or ``None`` where not applicable."""
    lib = library()
    lay = layout(step)
    if lib is None or lay is None:
        return None
    a, b = xs
    if a.dtype != b.dtype or a.dtype not in DTYPES:
        return None
    if a.device.type != "cpu" or b.device.type != "cpu":
        return None
    size = step.size
    ta, tb = step.inputs
    if lay.left == 1:
        a, b, ta, tb = b, a, tb, ta
    ga = _grouped(a, ta, (lay.batch, lay.rows, lay.summed), size)
    gb = _grouped(b, tb, (lay.batch, lay.summed, lay.cols), size)
    if gb.stride(2) != 1 and gb.shape[2] > 1:
        gb = gb.contiguous()
    nb, m, k = ga.shape
    n = gb.shape[2]
    # Allocated in the output's own shape (not a view of a 3-d buffer: autograd
    # forbids in-place changes to views made inside a Function).
    shape = [size[c] for c in lay.batch + lay.rows + lay.cols]
    values = torch.empty(shape, dtype=a.dtype)
    index = torch.empty(shape, dtype=torch.int64) if argmax else None
    if values.numel():
        fn = lib.forward[a.dtype]
        threads = torch.get_num_threads() if nb * m * n * k >= PARALLEL_MIN_TERMS else 1
        fn(
            ga.data_ptr(),
            gb.data_ptr(),
            values.data_ptr(),
            index.data_ptr() if index is not None else None,
            nb,
            m,
            k,
            n,
            ga.stride(0),
            ga.stride(1),
            ga.stride(2),
            gb.stride(0),
            gb.stride(1),
            threads,
        )
    values = _to_output(values, lay)
    if index is None:
        return values, a.new_empty((0,), dtype=torch.int64)
    return values, _to_output(index, lay)


def _to_output(x: Tensor, lay: Layout) -> Tensor:
    if lay.out_order == tuple(range(x.dim())):
        return x
    return x.permute(lay.out_order).contiguous()


def _ungroup(
    grad: Tensor, term: str, groups: tuple[str, ...], size: dict[str, int], like: Tensor
) -> Tensor:
    """A gradient in grouped form (see :func:`_grouped`) in the layout and shape of ``like``."""
    order = "".join(groups)
    grad = grad.view([size[c] for c in order]).permute([order.index(c) for c in term])
    lacking = tuple(d for d, (n, full) in enumerate(zip(like.shape, grad.shape)) if n != full)
    return grad.sum(lacking, keepdim=True) if lacking else grad


def max_plus_vjp(
    step: Step, xs: list[Tensor], index: Tensor, g: Tensor, needs: list[bool]
) -> list[Tensor | None]:
    """First-order gradients of a ``tropical`` step from its argmax (not differentiable).

    Each output cell's cotangent goes to its argmax term: one pass over the cells.
    """
    lib = library()
    lay = layout(step)
    assert lib is not None and lay is not None, f"not a tropical step: {step}"
    size = step.size
    a, b = xs
    ta, tb = step.inputs
    need_a, need_b = needs
    if lay.left == 1:
        a, b, ta, tb, need_a, need_b = b, a, tb, ta, need_b, need_a
    groups_a = (lay.batch, lay.rows, lay.summed)
    groups_b = (lay.batch, lay.summed, lay.cols)
    nb, m, n = (_prod(size[c] for c in grp) for grp in (lay.batch, lay.rows, lay.cols))
    k = _prod(size[c] for c in lay.summed)
    back = [0] * len(lay.out_order)
    for d, p in enumerate(lay.out_order):
        back[p] = d
    order = tuple(back)
    shape = [size[c] for c in step.output]
    dtype = a.dtype
    gl = g.to(dtype).expand(shape).permute(order).contiguous()
    il = index.permute(order).contiguous()
    ga = torch.zeros((nb, m, k), dtype=dtype) if need_a else None
    gb = torch.zeros((nb, k, n), dtype=dtype) if need_b else None
    if gl.numel():
        threads = torch.get_num_threads() if nb > 1 and nb * m * n >= PARALLEL_MIN_TERMS else 1
        lib.vjp[dtype](
            gl.data_ptr(),
            il.data_ptr(),
            ga.data_ptr() if ga is not None else None,
            gb.data_ptr() if gb is not None else None,
            nb,
            m,
            k,
            n,
            threads,
        )
    grads = [
        _ungroup(ga, ta, groups_a, size, a) if ga is not None else None,
        _ungroup(gb, tb, groups_b, size, b) if gb is not None else None,
    ]
    return grads[::-1] if lay.left == 1 else grads
