"""Memory budgets: how big a window tensor may be."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._cache import cached, register

# Every AutomaticBlockSize that cached free CUDA memory (weakly held): clear_caches()
# empties their caches.
_INSTANCES: weakref.WeakSet[AutomaticBlockSize] = weakref.WeakSet()


class AutomaticBlockSize:
    """Size windows automatically from a memory budget.

    The budget caps the bytes of the largest temporary tensor that any step of
    a contraction creates -- the window tensor together with the output
    dimensions it carries -- in the forward and in the backward pass.  Tensors
    the size of an input or of the output are not counted.  On CPU the budget
    is ``max_cpu_bytes``; on CUDA it is ``max_cuda_bytes`` or, when that is
    ``None``, a proportion of the free device memory (queried with
    :func:`torch.cuda.mem_get_info`).  Within the budget, windows are kept
    small enough to stay in cache on CPU, which is faster as well as leaner.

    Args:
        max_cpu_bytes: Budget on CPU, in bytes (default 1 GiB).
        max_cuda_bytes: Budget on CUDA, in bytes; ``None`` means "derive it
            from the free memory".
        cache_available_cuda_memory: Query the free CUDA memory once per
            device and reuse it (scaled by ``cuda_memory_proportion``).
        cuda_memory_proportion: Fraction of the free CUDA memory to use when
            the query is cached.
        repr_string: What ``repr`` returns, if given.

    Example:
        >>> import torch
        >>> from semiring_einsum.func import AutomaticBlockSize, log_einsum
        >>> a = torch.zeros(3, 4)
        >>> log_einsum("ij,jk->ik", a, a.T,
        ...            block_size=AutomaticBlockSize(max_cpu_bytes=1 << 20)).shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        max_cpu_bytes: int = 1 << 30,
        max_cuda_bytes: int | None = None,
        cache_available_cuda_memory: bool = True,
        cuda_memory_proportion: float = 0.8,
        repr_string: str | None = None,
    ) -> None:
        if not _positive_int(max_cpu_bytes):
            raise ValueError(f"max_cpu_bytes must be a positive int, got {max_cpu_bytes!r}")
        if max_cuda_bytes is not None and not _positive_int(max_cuda_bytes):
            raise ValueError(
                f"max_cuda_bytes must be None or a positive int, got {max_cuda_bytes!r}"
            )
        if (
            isinstance(cuda_memory_proportion, bool)
            or not isinstance(cuda_memory_proportion, (int, float))
            or not 0.0 < cuda_memory_proportion <= 1.0
        ):
            raise ValueError(
                f"cuda_memory_proportion must be a number in (0, 1], got {cuda_memory_proportion!r}"
            )
        self.max_cpu_bytes = max_cpu_bytes
        self.max_cuda_bytes = max_cuda_bytes
        self.cache_available_cuda_memory = cache_available_cuda_memory
        self.cuda_memory_proportion = cuda_memory_proportion
        self.repr_string = repr_string
        self.available_cuda_memory: dict[int | None, int] = {}

    def __repr__(self) -> str:
        if self.repr_string is not None:
            return self.repr_string
        return (
            f"AutomaticBlockSize(max_cpu_bytes={self.max_cpu_bytes}, "
            f"max_cuda_bytes={self.max_cuda_bytes})"
        )

    def budget_bytes(self, device: torch.device) -> int:
        """The budget in bytes for tensors on ``device``."""
        if device.type != "cuda":
            return self.max_cpu_bytes
        if self.max_cuda_bytes is not None:
            return self.max_cuda_bytes
        if not self.cache_available_cuda_memory:
            return _free_cuda_bytes(device)
        key = device.index
        if key not in self.available_cuda_memory:
            free = _free_cuda_bytes(device)
            self.available_cuda_memory[key] = int(self.cuda_memory_proportion * free)
            _INSTANCES.add(self)  # (clear_caches() empties it; unpickled ones too)
        return self.available_cuda_memory[key]


def _positive_int(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def _free_cuda_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    # Memory the caching allocator holds but does not use is free for us too.
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


AUTOMATIC_BLOCK_SIZE = AutomaticBlockSize(repr_string="AUTOMATIC_BLOCK_SIZE")
"""The default :class:`AutomaticBlockSize`: 1 GiB on CPU; on CUDA, 80% of the
free memory, queried once per device."""

BlockSize = int | AutomaticBlockSize | None


@dataclass(frozen=True, slots=True)
class Budget:
    """A resolved ``block_size``: either a fixed window extent or a byte cap.

    Exactly one of the two fields is set.
    """

    extent: int | None = None
    bytes: int | None = None

    def as_ints(self) -> tuple[int, int]:
        """``(extent, bytes)`` with 0 for the field not set (see :func:`budget_of`)."""
        return self.extent or 0, self.bytes or 0


def budget_of(extent: int, nbytes: int) -> Budget:
    """The :class:`Budget` of :meth:`Budget.as_ints`, one shared object per value.

    For the in-graph contraction functions, which take plain ints (Dynamo
    does not trace into them, and it warns about ``lru_cache`` in code it
    traces).  ``int()`` turns a value the compiler made symbolic (an int
    argument that changed between calls) back into the concrete one that
    plans are cached on, before the cache hashes it.
    """
    return _budget_of(int(extent), int(nbytes))


@cached(maxsize=256)
def _budget_of(extent: int, nbytes: int) -> Budget:
    return Budget(extent or None, nbytes or None)


@register
def cache_clear() -> None:
    """Empty the cache of :func:`budget_of`, and every :class:`AutomaticBlockSize`'s cached
    free CUDA memory (``AUTOMATIC_BLOCK_SIZE``'s included)."""
    _budget_of.cache_clear()
    for automatic in list(_INSTANCES):
        automatic.available_cuda_memory.clear()


def resolve_budget(block_size: object, device: torch.device, equation: object = None) -> Budget:
    """Validate ``block_size`` and turn it into a hashable :class:`Budget`.

    ``equation``, when given, is named in the error messages.
    """
    if block_size is None:
        block_size = AUTOMATIC_BLOCK_SIZE
    if isinstance(block_size, AutomaticBlockSize):
        return Budget(bytes=block_size.budget_bytes(device))
    where = "" if equation is None else f" (equation {equation!r})"
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size must be a positive int or an AutomaticBlockSize, got "
            f"{type(block_size).__name__}{where}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}{where}")
    return Budget(extent=block_size)
