"""The native max-plus kernel: a small C file built once per machine, called through ctypes.

Max-plus has no BLAS.  Broadcast-and-reduce in torch writes every term to memory; a fused
loop that keeps each output row's running maximum and argmax in cache does one add, one
compare and two blends per term, vectorized by the C compiler.  That loop and its kin (the
vjp, the ranked and k-best loops, the sampler's draw, strided copies) are C files beside this
module (:data:`NATIVE_DIR`, package data); this module builds them with the system C compiler
(``cc``, or ``$CC``) the first time a process needs them, caches the shared library under the
user's cache directory (keyed by the source, the flags, the compiler, what it resolves
``-march=native`` to, and the CPU; see :func:`library`), and loads it with :mod:`ctypes`
(which releases the GIL during the call).  OpenMP splits the work over
``torch.get_num_threads()`` threads; in a process that has loaded torch, the library's
``libgomp.so.1`` is the one torch already loaded, so both share one thread pool.

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
from ._cache import cached, register
from ._context import untraced
from ._plan import Step
from ._torch_compat import is_functorch_wrapped_tensor as _wrapped

Tensor = torch.Tensor

NATIVE_DIR = Path(__file__).with_name("native")
"""The kernels' C source: ``tropical.c``, which includes the templates ``maxplus.h`` (once
per dtype), ``tiles.h`` (once per tile variant) and ``copy.h`` (once per element width)."""

_FILES = ("tropical.c", "maxplus.h", "tiles.h", "copy.h")


def _source() -> str:
    """The source files, each under a line naming it (what the cache key hashes); empty
    where one is missing (a damaged install: the library then reports it)."""
    try:
        return "".join(f"/* {name} */\n{(NATIVE_DIR / name).read_text()}" for name in _FILES)
    except OSError:
        return ""


SOURCE = _source()
"""The kernels' C source files, concatenated (hashed into the cache key)."""

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
register(_STATUS.clear)  # (with the library: the next call loads it anew)


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
        src = NATIVE_DIR / "tropical.c"
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


@cached(maxsize=1)
def library() -> _Library | None:
    """The loaded kernel library, built on first use; ``None`` where it is unavailable.

    The build goes to the cache directory (see docs/internals.md) if it is safe (ours,
    writable by us alone) and writable; else, with one warning, to a private temporary
    directory of this process."""
    reason, cc = _unavailable()
    if cc is None:
        _STATUS["reason"] = reason
        _require(reason)
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
        _require(_STATUS["reason"])
        return None
    _STATUS["reason"] = f"loaded {target}"
    return lib


_DISABLED = "disabled by SEMIRING_EINSUM_NATIVE=0"


def _require(reason: str) -> None:
    """Under ``SEMIRING_EINSUM_REQUIRE_NATIVE=1``, a library that cannot load is an error
    (CI sets it wherever there is a C compiler, so a lost kernel fails the run);
    ``SEMIRING_EINSUM_NATIVE=0`` still turns the kernel off on purpose."""
    if reason != _DISABLED and os.environ.get("SEMIRING_EINSUM_REQUIRE_NATIVE") == "1":
        raise RuntimeError(
            "SEMIRING_EINSUM_REQUIRE_NATIVE=1, but the native max-plus kernel cannot "
            f"load: {reason}"
        )


def _unavailable() -> tuple[str, list[str] | None]:
    """Why the library cannot be built here, or ``("", the compiler's command)`` where it
    can be tried (checked without running anything)."""
    if os.environ.get("SEMIRING_EINSUM_NATIVE", "1") == "0":
        return _DISABLED, None
    if not sys.platform.startswith("linux"):
        return f"not built on {sys.platform} (Linux only)", None
    cc = _compiler()
    if cc is None:
        return "no C compiler found (cc, gcc, clang or $CC)", None
    if not SOURCE:
        return f"the kernel's C files are missing from {NATIVE_DIR}", None
    return "", cc


def expected() -> bool:
    """Whether max-plus steps will run on the library, without building it (what plans
    read: planning never starts a compiler).  Once :func:`library` has been tried, its
    answer; before, whether it can be tried (see :func:`_unavailable`).  Where that
    first build then fails, the steps planned on it run the torch kernels."""
    if library.cache_info().currsize:
        return library() is not None
    reason, cc = _unavailable()
    if cc is None:
        _require(reason)
    return cc is not None


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
    see ``native/copy.h``)."""
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


@cached(maxsize=4096)
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


def unravel(step: Step, linear: Tensor) -> Tensor:
    """:func:`._kernels.unravel`; for a step with a coordinate table, by the native loop:
    one pass over ``linear`` in any layout (a permuted argmax: no copy first), a lookup
    per cell.  (:func:`._kernels.unravel` where that does not apply: no library, a
    traced or wrapped tensor, no table.)"""
    lib = library()
    if (
        lib is None
        or not K.small_terms(step)
        or linear.dtype != torch.int64
        or linear.dim() > 16
        or not _plain(linear)
        or not untraced()
    ):
        return K.unravel(step, linear)
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
    return K.unravel(step, linear) if failed else out


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


def _rank_share(step: Step, lay: Layout, strides: Sequence[int]) -> Tensor:
    """Each linear position of the summed group's share of the global rank (``w[s]``)."""
    return _rank_share_of(step, lay.a.groups[2], tuple(strides))


@cached(maxsize=1024)
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
