"""Pre-compiled equations and block helpers (mirrors ``torch_semiring_einsum.equation``).

:class:`Equation` is the class that every drop-in function accepts, and
:func:`compile_equation` builds one from a string.  An ``Equation`` is
computed from its fields (``input_variables`` and ``output_variables``), not
from ``source``, so one built by hand behaves as its fields say.

The other names are the helpers that torch-semiring-einsum 1.2.0 keeps in this
module and that extensions written against it call: the data structures of
``prepare_for_*`` (:class:`ReduceInfo`, :class:`LookupInfo`,
:func:`create_reduce_info`) and the reference's block-size arithmetic.  They
give the reference's results; our own contractions are planned by
:mod:`semiring_einsum.func` and do not use them.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from .func._budget import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize
from .func._cache import cached
from .func._parse import ELLIPSIS, parse_subscripts, resolve

Tensor = torch.Tensor

__all__ = [
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "Equation",
    "LookupInfo",
    "ReduceInfo",
    "block_sizes_to_indexes",
    "compile_equation",
    "create_reduce_info",
    "generate_slices",
    "get_automatic_block_size_indexes",
    "get_automatic_block_sizes",
    "get_available_bytes",
    "get_available_bytes_cuda",
    "get_bits_per_element",
    "get_bytes_per_element",
    "get_cuda_free_bytes",
    "get_cuda_memory_reserved",
    "get_fixed_block_size_indexes",
    "get_output_elements",
    "get_real_available_cuda_bytes",
    "get_summed_variable_indexes",
    "get_variables_not_in",
]


class Equation:
    """A pre-compiled einsum equation (see :func:`compile_equation`).

    The fields are those of torch-semiring-einsum, and they are what every
    function computes from: ``source`` is kept for display only, so an
    ``Equation`` built by hand from fields (with any ``source``, even ``''``)
    computes what its fields say.  Variables are numbered from 0; any distinct
    ints work, up to 52 of them in one equation.  To change the fields of an
    equation already used, assign new lists: like the reference's
    ``prepare_for_*`` results, what is derived from the fields is computed once
    per field object.

    Attributes:
        source: The equation string, for display.
        variable_locations: For each variable, the ``(argument, dimension)``
            pairs where it appears.
        input_variables: For each argument, the variable of each of its
            dimensions.
        output_variables: The variable of each output dimension.
        num_variables: How many variables there are.
        reduce_input_to_output: ``None`` until :meth:`prepare_for_forward`,
            then a :class:`ReduceInfo` from the inputs to the output.
        reduce_others_to_input: ``None`` until :meth:`prepare_for_backward`,
            then one :class:`ReduceInfo` per input.
        reduce_all_to_input: ``None`` until :meth:`prepare_for_log_backward`,
            then one ``(ReduceInfo, LookupInfo)`` pair per input.

    Example:
        >>> import torch, semiring_einsum
        >>> eq = semiring_einsum.Equation("", [[(0, 0)], [(0, 1)]], [[0, 1]], [1], 2)
        >>> eq
        Equation('', computes='ab->b')
        >>> semiring_einsum.einsum(eq, torch.arange(6.0).reshape(2, 3))
        tensor([3., 5., 7.])
    """

    # Private state, as class defaults so that any instance has it.  Set by
    # compile_equation only: the letter of each variable, used to name the
    # einsum string so that errors quote the user's letters; and, for an
    # equation with '...', the string itself, since the fields cannot say where
    # '...' goes.  Set by subscripts_of: its result and the fields it came from.
    _letters: str | None = None
    _ellipsis_source: str | None = None
    _subscripts_cache: tuple[Any, Any, str] | None = None

    def __init__(
        self,
        source: str,
        variable_locations: Sequence[Sequence[tuple[int, int]]],
        input_variables: Sequence[Sequence[int]],
        output_variables: Sequence[int],
        num_variables: int,
    ) -> None:
        self.source = source
        self.variable_locations = variable_locations
        self.input_variables = input_variables
        self.output_variables = output_variables
        self.num_variables = num_variables
        self.reduce_input_to_output: ReduceInfo | None = None
        self.reduce_others_to_input: list[ReduceInfo] | None = None
        self.reduce_all_to_input: list[tuple[ReduceInfo, LookupInfo]] | None = None

    def __repr__(self) -> str:
        try:
            computed = self.subscripts_of()
        except Exception:  # a repr must not raise, whatever the fields hold
            return f"Equation({self.source!r}, invalid fields)"
        if isinstance(self.source, str) and computed == "".join(self.source.split()):
            return f"Equation({self.source!r})"
        return f"Equation({self.source!r}, computes={computed!r})"

    # ------------------------------------------------------------ the reference's methods
    def validate_sizes(self, args: Sequence[Tensor]) -> None:
        """Check that every variable has one size across ``args``.

        Args:
            args: The tensors, one per entry of ``input_variables``.

        Raises:
            ValueError: if the fields do not fit ``args`` or a variable has two sizes.
        """
        self._check_arguments(args)
        for variable, locations in enumerate(self.variable_locations):
            sizes = [(k, d, self._size(args, k, d, variable)) for k, d in locations]
            for k, d, size in sizes[1:]:
                k0, d0, size0 = sizes[0]
                if size != size0:
                    raise ValueError(
                        f"{self!r}: variable {variable} has size {size0} at dimension {d0} "
                        f"of argument {k0} but size {size} at dimension {d} of argument {k}"
                    )

    def get_sizes(self, args: Sequence[Tensor], variables: Iterable[int]) -> list[int]:
        """The size of each of ``variables``, read from its first location in ``args``."""
        result = []
        for variable in variables:
            try:
                k, d = self.variable_locations[variable][0]
            except (IndexError, KeyError, TypeError):
                raise ValueError(
                    f"{self!r}: variable_locations has no location for variable {variable!r}"
                ) from None
            result.append(self._size(args, k, d, variable))
        return result

    def all_variables(self) -> range:
        """``range(num_variables)``."""
        return range(self.num_variables)

    def prepare_for_forward(self) -> None:
        """Build :attr:`reduce_input_to_output` once."""
        if self.reduce_input_to_output is None:
            self.reduce_input_to_output = create_reduce_info(
                self.input_variables, self.output_variables
            )

    def prepare_for_backward(self) -> None:
        """Build :attr:`reduce_others_to_input` once (one entry per input).

        Entry ``i`` reduces the other inputs, with input ``i`` replaced by the
        output (its gradient), to the variables of input ``i``.
        """
        if self.reduce_others_to_input is None:
            infos = []
            for i, target in enumerate(self.input_variables):
                sources = list(self.input_variables)
                sources[i] = self.output_variables
                infos.append(create_reduce_info(sources, target))
            self.reduce_others_to_input = infos

    def prepare_for_log_backward(self) -> None:
        """Build :attr:`reduce_all_to_input` once (one pair per input).

        Pair ``i`` reduces all the inputs to the variables of input ``i``; its
        :class:`LookupInfo` (taken out of the :class:`ReduceInfo`) looks up an
        output-shaped tensor in the same layout.
        """
        if self.reduce_all_to_input is None:
            sources = [*self.input_variables, self.output_variables]
            pairs = []
            for target in self.input_variables:
                info = create_reduce_info(sources, target)
                output_lookup = info.lookup_info.pop()
                pairs.append((info, output_lookup))
            self.reduce_all_to_input = pairs

    # ------------------------------------------------------------ ours
    def _size(self, args: Sequence[Tensor], k: int, d: int, variable: int) -> int:
        try:
            return int(args[k].size(d))
        except (IndexError, TypeError):
            shapes = [tuple(a.shape) for a in args]
            raise ValueError(
                f"{self!r}: variable_locations puts variable {variable} at dimension {d!r} of "
                f"argument {k!r}, which the arguments (shapes {shapes}) do not have"
            ) from None

    def _check_arguments(self, args: Sequence[Tensor]) -> None:
        """Raise a ValueError unless ``input_variables`` fits the tensors' count and ranks."""
        n = len(self.input_variables)
        if len(args) != n:
            raise ValueError(
                f"{self!r}: input_variables describes {n} argument(s) but {len(args)} were given"
            )
        if self._ellipsis_source is not None:
            return  # the ranks under '...' are checked against the parsed string
        for k, (variables, arg) in enumerate(zip(self.input_variables, args)):
            if len(variables) != arg.dim():
                raise ValueError(
                    f"{self!r}: input_variables[{k}] lists {len(variables)} variable(s) "
                    f"but argument {k} has {arg.dim()} dimension(s)"
                )

    def subscripts_of(self) -> str:
        """The einsum string that the fields describe (one letter per variable).

        Raises:
            ValueError: if the fields describe no valid equation.
        """
        if self._ellipsis_source is not None:
            return self._ellipsis_source
        # Cached for the field objects it was computed from: assigning a new
        # list recomputes it; editing a list in place after use does not (as
        # with the reference's prepare_for_* results, also computed once).
        cached = self._subscripts_cache
        if (
            cached is not None
            and cached[0] is self.input_variables
            and cached[1] is self.output_variables
        ):
            return cached[2]
        result = self._compute_subscripts()
        self._subscripts_cache = (self.input_variables, self.output_variables, result)
        return result

    def _compute_subscripts(self) -> str:
        try:
            inputs = [list(term) for term in self.input_variables]
            output = list(self.output_variables)
        except TypeError:
            raise ValueError(
                f"Equation({self.source!r}): input_variables must be a list of lists of "
                "variable numbers and output_variables a list of variable numbers"
            ) from None
        order: dict[int, None] = {}
        for k, term in enumerate(inputs):
            for d, variable in enumerate(term):
                if not isinstance(variable, int) or isinstance(variable, bool):
                    raise ValueError(
                        f"Equation({self.source!r}): input_variables[{k}][{d}] must be an int "
                        f"variable number, got {variable!r}"
                    )
                order.setdefault(variable)
        seen: set[int] = set()
        for d, variable in enumerate(output):
            if variable in seen:
                raise ValueError(
                    f"Equation({self.source!r}): output_variables repeats variable {variable!r}"
                )
            if variable not in order:
                raise ValueError(
                    f"Equation({self.source!r}): output_variables[{d}] is variable "
                    f"{variable!r}, which no entry of input_variables uses"
                )
            seen.add(variable)
        if len(order) > len(string.ascii_letters):
            raise ValueError(
                f"Equation({self.source!r}) uses {len(order)} distinct variables; "
                f"at most {len(string.ascii_letters)} are supported"
            )
        hint = self._letters
        if hint is not None and all(0 <= v < len(hint) for v in order):
            letter = {v: hint[v] for v in order}
        else:
            letter = dict(zip(order, string.ascii_letters))
        lhs = ",".join("".join(letter[v] for v in term) for term in inputs)
        return lhs + "->" + "".join(letter[v] for v in output)


def compile_equation(equation: str) -> Equation:
    """Parse an einsum equation into an :class:`Equation`.

    Any :func:`torch.einsum` equation is accepted, including an implicit
    output, ``...`` and spaces.  Variables are numbered in order of first
    appearance; the fields are lists, as in torch-semiring-einsum.  With
    ``...``, the fields hold the named variables only and a dimension after
    ``...`` is counted from the end of its argument (a negative number), since
    how many dimensions ``...`` covers is known only from the tensors.

    Passing the string itself to the einsum functions works equally well.

    Args:
        equation: An equation in :func:`torch.einsum` syntax.

    Raises:
        EquationError: (a ``ValueError``) if the equation is malformed.

    Example:
        >>> import semiring_einsum
        >>> eq = semiring_einsum.compile_equation("ij,jk->ik")
        >>> eq.input_variables, eq.output_variables, eq.num_variables
        ([[0, 1], [1, 2]], [0, 2], 3)
        >>> eq.variable_locations
        [[(0, 0)], [(0, 1), (1, 0)], [(1, 1)]]
    """
    sub = parse_subscripts(equation)
    numbers: dict[str, int] = {}
    locations: list[list[tuple[int, int]]] = []
    inputs: list[list[int]] = []
    for k, term in enumerate(sub.inputs):
        ids = []
        dots = term.index(ELLIPSIS) if ELLIPSIS in term else None
        for d, token in enumerate(term):
            if token == ELLIPSIS:
                continue
            if token not in numbers:
                numbers[token] = len(numbers)
                locations.append([])
            dim = d - len(term) if dots is not None and d > dots else d
            locations[numbers[token]].append((k, dim))
            ids.append(numbers[token])
        inputs.append(ids)
    if sub.output is None:
        letters = [c for c in _implicit_output(sub) if c in numbers]
    else:
        letters = [t for t in sub.output if t != ELLIPSIS]
    result = Equation(equation, locations, inputs, [numbers[c] for c in letters], len(numbers))
    if any(ELLIPSIS in term for term in sub.inputs):
        result._ellipsis_source = equation
    else:
        result._letters = "".join(numbers)
    return result


def _implicit_output(sub: Any) -> str:
    """The implicit output letters of an equation (ranks do not matter here)."""
    ranks = tuple(len([t for t in term if t != ELLIPSIS]) for term in sub.inputs)
    return resolve(sub, ranks).output


_compile_cached = cached(maxsize=1024)(compile_equation)


def as_equation(equation: Equation | str) -> Equation:
    """``equation`` itself, or the string compiled (cached)."""
    if isinstance(equation, Equation):
        return equation
    if isinstance(equation, str):
        return _compile_cached(equation)
    raise TypeError(f"equation must be an Equation or a str, got {type(equation).__name__}")


def get_variables_not_in(variables: Iterable[int], excluded: Any) -> list[int]:
    """The distinct ``variables`` not in ``excluded``, in order of first appearance."""
    kept: dict[int, None] = {}
    for variable in variables:
        if variable not in excluded:
            kept.setdefault(variable)
    return list(kept)


# ---------------------------------------------------------------- reduce structures
class LookupInfo:
    """How to bring one argument into the layout of a window's term tensor.

    The term layout is the target variables, then the reduced variables.
    :meth:`lookup` slices the argument's reduced dimensions to the window,
    appends size-1 dimensions for the variables it lacks and permutes.

    Attributes:
        index_map: ``(position in var_values, dimension)`` for each dimension
            of the argument that is a reduced variable.
        num_extra_vars: How many size-1 dimensions to append.
        permutation: The permutation into the term layout.
    """

    def __init__(
        self,
        index_map: list[tuple[int, int]],
        num_extra_vars: int,
        permutation: list[int],
    ) -> None:
        self.index_map = index_map
        self.num_extra_vars = num_extra_vars
        self.permutation = permutation

    def lookup(self, arg: Tensor, var_values: Sequence[Any]) -> Tensor:
        """A view of ``arg`` for one window, in the term layout.

        Args:
            arg: The argument.
            var_values: One ``slice`` (or index) per reduced variable.
        """
        index: list[Any] = [slice(None)] * arg.dim()
        for position, dim in self.index_map:
            index[dim] = var_values[position]
        index.extend([None] * self.num_extra_vars)
        return arg[tuple(index)].permute(self.permutation)


class ReduceInfo:
    """What a blocked pass needs to reduce some variables to others.

    Attributes:
        lookup_info: One :class:`LookupInfo` per argument.
        output_variables: The variables kept, in order.
        reduced_variables: The variables summed out, in order of first appearance.
        reduced_dims: Their dimensions in the term tensor (after the kept ones).
    """

    def __init__(
        self,
        lookup_info: list[LookupInfo],
        output_variables: Sequence[int],
        reduced_variables: list[int],
        reduced_dims: tuple[int, ...],
    ) -> None:
        self.lookup_info = lookup_info
        self.output_variables = output_variables
        self.reduced_variables = reduced_variables
        self.reduced_dims = reduced_dims

    def get_summed_variable_indexes(
        self,
        equation: Equation,
        args: Sequence[Tensor],
        block_size: int | AutomaticBlockSize,
        output_dtypes: Sequence[torch.dtype | None] = (None,),
    ) -> Iterable[tuple[slice, ...]]:
        """The windows over :attr:`reduced_variables` (see :func:`get_summed_variable_indexes`)."""
        return get_summed_variable_indexes(
            equation, args, self.reduced_variables, block_size, output_dtypes
        )

    def get_term_size(
        self, equation: Equation, args: Sequence[Tensor], var_values: Sequence[slice]
    ) -> list[int]:
        """The shape of one window's term tensor: kept sizes, then window extents."""
        kept = equation.get_sizes(args, self.output_variables)
        return kept + [s.stop - s.start for s in var_values]


def create_reduce_info(
    input_vars: Sequence[Sequence[int]], output_vars: Sequence[int]
) -> ReduceInfo:
    """Build the :class:`ReduceInfo` that reduces ``input_vars`` to ``output_vars``.

    Args:
        input_vars: The variables of each argument.
        output_vars: The variables to keep.

    Example:
        >>> from semiring_einsum.equation import create_reduce_info
        >>> info = create_reduce_info([[0, 1], [1, 2]], [0, 2])
        >>> info.reduced_variables, info.reduced_dims
        ([1], (2,))
        >>> [(x.index_map, x.num_extra_vars, x.permutation) for x in info.lookup_info]
        [([(0, 1)], 1, [0, 2, 1]), ([(0, 0)], 1, [2, 1, 0])]
    """
    reduced = get_variables_not_in(itertools.chain.from_iterable(input_vars), set(output_vars))
    position = {v: i for i, v in enumerate(reduced)}
    layout = [*output_vars, *reduced]
    infos = []
    for variables in input_vars:
        index_map = [(position[v], d) for d, v in enumerate(variables) if v in position]
        # The dimension holding each variable (its last, if it repeats); the
        # variables the argument lacks go to appended size-1 dimensions, which
        # are counted from the number of distinct variables it has.
        dim_of = {v: d for d, v in enumerate(variables)}
        extra = 0
        permutation = []
        for v in layout:
            if v in dim_of:
                permutation.append(dim_of[v])
            else:
                permutation.append(len(dim_of) + extra)
                extra += 1
        infos.append(LookupInfo(index_map, extra, permutation))
    n = len(output_vars)
    return ReduceInfo(infos, output_vars, reduced, tuple(range(n, n + len(reduced))))


# ---------------------------------------------------------------- block sizes
def get_summed_variable_indexes(
    equation: Equation,
    args: Sequence[Tensor],
    variables: Sequence[int],
    block_size: int | AutomaticBlockSize,
    output_dtypes: Sequence[torch.dtype | None],
) -> Iterable[tuple[slice, ...]]:
    """The windows over ``variables``: tuples of one ``slice`` per variable.

    Args:
        equation: The equation (for the variables' sizes).
        args: The tensors.
        variables: The variables to window.
        block_size: A fixed extent (int) or an :class:`AutomaticBlockSize`.
        output_dtypes: The output's component dtypes (``None``: the args' dtype),
            for the automatic size.

    Raises:
        ValueError: for any other ``block_size``.
    """
    sizes = equation.get_sizes(args, variables)
    if isinstance(block_size, int):
        return get_fixed_block_size_indexes(sizes, block_size)
    if isinstance(block_size, AutomaticBlockSize):
        return get_automatic_block_size_indexes(equation, args, sizes, block_size, output_dtypes)
    raise ValueError(f"block_size must be an int or an AutomaticBlockSize, got {block_size!r}")


def get_bits_per_element(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype`` (8 for ``torch.bool``).

    Raises:
        TypeError: for a dtype with no known width.
    """
    if dtype == torch.bool:
        return 8
    for info in (torch.finfo, torch.iinfo):
        try:
            return int(info(dtype).bits)
        except TypeError:
            pass
    raise TypeError(f"cannot tell how many bits an element of {dtype} has")


def get_bytes_per_element(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (whole bytes, rounded down)."""
    return get_bits_per_element(dtype) // 8


def get_fixed_block_size_indexes(
    sizes: Sequence[int], block_size: int
) -> Iterable[tuple[slice, ...]]:
    """The windows for one extent, ``block_size``, on every variable."""
    return block_sizes_to_indexes(sizes, [block_size] * len(sizes))


def block_sizes_to_indexes(
    sizes: Sequence[int], block_sizes: Iterable[int]
) -> Iterator[tuple[slice, ...]]:
    """All windows, in row-major order, for one extent per variable.

    Example:
        >>> from semiring_einsum.equation import block_sizes_to_indexes
        >>> list(block_sizes_to_indexes([3, 1], [2, 1]))
        [(slice(0, 2, None), slice(0, 1, None)), (slice(2, 3, None), slice(0, 1, None))]
    """
    per_variable = [list(generate_slices(n, b)) for n, b in zip(sizes, block_sizes)]
    return itertools.product(*per_variable)


def generate_slices(total_size: int, block_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``block_size`` covering ``range(total_size)``.

    Raises:
        ValueError: if ``block_size`` is less than 1 (the reference loops forever).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size!r}")
    for start in range(0, total_size, block_size):
        yield slice(start, min(start + block_size, total_size))


def get_automatic_block_size_indexes(
    equation: Equation,
    args: Sequence[Tensor],
    sizes: Sequence[int],
    auto_block_size: AutomaticBlockSize,
    output_dtypes: Sequence[torch.dtype | None],
) -> Iterable[tuple[slice, ...]]:
    """The windows that torch-semiring-einsum's memory estimate allows.

    Its estimate: the budget, less twice the output's bytes (the output and
    one partial sum), divided by the bytes of an element of ``args``, bounds
    the product of the window extents (see :func:`get_automatic_block_sizes`).
    Our own functions size windows differently (:class:`AutomaticBlockSize`).
    """
    if not args:
        return []
    dtype = args[0].dtype
    budget = get_available_bytes(args[0].device, auto_block_size)
    per_output_element = sum(
        get_bytes_per_element(dtype if d is None else d) for d in output_dtypes
    )
    output_bytes = 2 * per_output_element * get_output_elements(equation, args)
    elements = (budget - output_bytes) // get_bytes_per_element(dtype)
    return block_sizes_to_indexes(sizes, get_automatic_block_sizes(sizes, elements))


def get_available_bytes(device: torch.device, auto_block_size: AutomaticBlockSize) -> int:
    """The budget of ``auto_block_size`` on ``device``.

    Raises:
        ValueError: for a device that is neither CPU nor CUDA, as the reference.
    """
    if device.type == "cuda":
        return get_available_bytes_cuda(device, auto_block_size)
    if device.type == "cpu":
        return auto_block_size.max_cpu_bytes
    raise ValueError(f"no memory budget for device {device!r}")


def get_available_bytes_cuda(device: torch.device, auto_block_size: AutomaticBlockSize) -> int:
    """The CUDA budget: ``max_cuda_bytes``, or from the free memory (cached if asked)."""
    if auto_block_size.max_cuda_bytes is not None:
        return auto_block_size.max_cuda_bytes
    if not auto_block_size.cache_available_cuda_memory:
        return get_real_available_cuda_bytes(device)
    cache = auto_block_size.available_cuda_memory
    if device.index not in cache:
        share = auto_block_size.cuda_memory_proportion * get_real_available_cuda_bytes(device)
        cache[device.index] = round(share)
    return cache[device.index]


def get_real_available_cuda_bytes(device: torch.device) -> int:
    """Free CUDA memory plus what the caching allocator holds unused."""
    unused = get_cuda_memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(unused + get_cuda_free_bytes(device))


get_cuda_memory_reserved = torch.cuda.memory_reserved


def get_cuda_free_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, in bytes."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def get_output_elements(equation: Equation, args: Sequence[Tensor]) -> int:
    """The number of elements of the output."""
    return math.prod(equation.get_sizes(args, equation.output_variables))


def get_automatic_block_sizes(sizes: Sequence[int], available_elements: int) -> list[int]:
    """One extent per variable whose product stays within ``available_elements``.

    Greedy, as torch-semiring-einsum: variables are taken from the smallest
    up, each whole while the product fits; the first that does not fit gets
    what is left and the rest 1.  With no room at all, every extent is 1.

    Example:
        >>> from semiring_einsum.equation import get_automatic_block_sizes
        >>> get_automatic_block_sizes([10, 3, 7], 50)
        [2, 3, 7]
    """
    extents = [1] * len(sizes)
    if available_elements <= 0:
        return extents
    product = 1
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        if product * sizes[index] > available_elements:
            extents[index] = available_elements // product
            break
        extents[index] = sizes[index]
        product *= sizes[index]
    return extents
