"""The call context: what torch's state and the operands say about how a call may run.

It is worked out once per call (and once per backward or forward-mode rule call, which run
later and perhaps under other transforms) and passed down.  This module is the one that
reads torch's state (tracers, dispatch modes, ``torch.func`` levels, forward-AD levels) to
build it, through the private symbols bound in :mod:`._torch_compat`; kernels and operators
only read the flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ._cache import cached
from ._torch_compat import (
    FORWARD_AD_LEVEL,
    FORWARD_AD_STATE,
    TransformType,
    get_current_dispatch_mode_stack,
    get_interpreter_stack,
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    is_legacy_batchedtensor,
    len_torch_dispatch_stack,
)

Tensor = torch.Tensor

_TRACING_MODES = ("ProxyTorchDispatchMode", "FakeTensorMode", "FunctionalTensorMode")


@dataclass(frozen=True, slots=True)
class Context:
    """How one call (or one rule call) may run.

    Attributes:
        device_type: The operands' device type (``'cpu'``, ``'cuda'``, ...).
        traced: A tracer records the call (``torch.compile``'s AOTAutograd, ``make_fx``,
            ``torch.func.linearize``): code must not branch on values, and value-branching
            kernels run as opaque operators.
        compiling: ``torch.compile`` traces the call (Dynamo refuses autograd Functions
            that define ``jvp``, so the jvp-less twins are used).
        batched: Some operand is a ``vmap`` tensor at this level.
        foreign: Some operand is a tensor subclass whose values Python cannot read
            (a fake tensor, say) though nothing traces or batches.
        derivative: A derivative of the result may be asked for: autograd records the call,
            or a forward-AD level or a torch.func transform other than ``vmap`` is open.
        transformed: A torch.func transform (``vmap`` included) or forward-AD level is open,
            or autograd records the call: the autograd Function must run.
        differentiated: (Rule calls only.)  The rule's own result may be differentiated
            again: grad mode is on in a backward (``create_graph``), or a forward-AD level
            or a torch.func transform is open.
    """

    device_type: str
    traced: bool
    compiling: bool
    batched: bool
    derivative: bool
    transformed: bool
    differentiated: bool = False
    foreign: bool = False

    def for_operands(self, xs: Sequence[Tensor]) -> Context:
        """This context for a call on ``xs`` (after a vmap rule folded a batch away)."""
        batched, foreign = _kinds(xs)
        return replace(self, batched=batched, foreign=foreign)

    @property
    def plain(self) -> bool:
        """Whether Python may read the operands' values (nothing traces, batches or hides)."""
        return not (self.traced or self.batched or self.foreign)


def tracing() -> bool:
    """Whether torch ops are being recorded into a graph rather than run."""
    if torch.compiler.is_compiling():
        return True
    if not len_torch_dispatch_stack():  # the common case, cheaply
        return False
    stack = get_current_dispatch_mode_stack()
    return any(type(mode).__name__ in _TRACING_MODES for mode in stack)


def _kinds(tensors: Sequence[Tensor]) -> tuple[bool, bool]:
    """(a tensor is a vmap tensor, a tensor is a subclass whose values are not there)."""
    batched = foreign = False
    for t in tensors:
        if is_legacy_batchedtensor(t):  # torch.autograd's own vmap
            batched = True
            continue
        while is_functorch_wrapped_tensor(t):
            if is_batchedtensor(t) or is_legacy_batchedtensor(t):
                batched = True
                break
            t = get_unwrapped(t)
        else:
            if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
                foreign = True
    return batched, foreign


def _levels() -> tuple[bool, bool]:
    """(a transform other than vmap is open, any transform or forward-AD level is open)."""
    if FORWARD_AD_STATE[FORWARD_AD_LEVEL] >= 0:
        return True, True
    stack = get_interpreter_stack()
    if not stack:
        return False, False
    vmap = TransformType.Vmap
    return any(level.key() != vmap for level in stack), True


@cached(maxsize=64)
def _eager(device_type: str, recorded: bool) -> Context:
    """The context of an eager call on plain tensors (one shared object per case)."""
    return Context(device_type, False, False, False, recorded, recorded)


# Bound once: the plain eager check runs on every call.  (The private ones are bound in
# ._torch_compat and imported as names, which costs the same.)
_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def untraced() -> bool:
    """Whether ops run on real values here: nothing compiles, no dispatch mode (a fake
    or tracing one) and no torch.func transform is active.  Cheap."""
    return not (_compiling() or len_torch_dispatch_stack() or get_interpreter_stack())


def _plain_eager(xs: Sequence[object]) -> Context | None:
    """The context when nothing traces or transforms and every operand is a plain tensor.

    The common case, checked with the cheapest calls first; ``None`` otherwise.
    """
    if (
        not xs
        or len_torch_dispatch_stack()
        or FORWARD_AD_STATE[FORWARD_AD_LEVEL] >= 0
        or get_interpreter_stack()
    ):
        return None
    if _compiling():
        return None
    recorded = False
    for x in xs:
        if type(x) not in _PLAIN_TYPES or is_legacy_batchedtensor(x):  # type: ignore[arg-type]
            return None
        recorded = recorded or x.requires_grad  # type: ignore[attr-defined]
    first = xs[0]
    assert isinstance(first, torch.Tensor)
    device = "cpu" if first.is_cpu else first.device.type
    return _eager(device, recorded and _grad_enabled())


def call_context(xs: Sequence[Tensor]) -> Context:
    """The context of a contraction call on ``xs``."""
    plain = _plain_eager(xs)
    if plain is not None:
        return plain
    xs = [x for x in xs if isinstance(x, torch.Tensor)]  # others are refused later, by name
    device = xs[0].device.type if xs else "cpu"
    recorded = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    traced = tracing()
    other, any_level = _levels()
    batched, foreign = _kinds(xs)
    return Context(
        device_type=device,
        traced=traced,
        compiling=torch.compiler.is_compiling(),
        batched=batched,
        derivative=recorded or other,
        transformed=recorded or any_level,
        foreign=foreign,
    )


def rule_context(tensors: Sequence[Tensor]) -> Context:
    """The context of a vjp or jvp rule running now on ``tensors``."""
    other, any_level = _levels()
    batched, foreign = _kinds(tensors)
    return Context(
        device_type=tensors[0].device.type if tensors else "cpu",
        traced=tracing(),
        compiling=torch.compiler.is_compiling(),
        batched=batched,
        foreign=foreign,
        derivative=False,
        transformed=any_level,
        differentiated=torch.is_grad_enabled() or any_level,
    )


def forward_over_forward() -> bool:
    """Whether two forward-mode (jvp) transforms are open at once."""
    stack = get_interpreter_stack()
    jvp = TransformType.Jvp
    return stack is not None and sum(1 for i in stack if i.key() == jvp) >= 2
