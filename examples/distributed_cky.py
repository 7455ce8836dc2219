"""CKY parsing over two processes: the PCFG's rule tensor sharded across ranks as a DTensor.

``examples/cky.py`` fills the CKY chart of a sentence one span width at a time with one
three-operand semiring einsum per width,

    chart[i, i+w, A] = ⊕_{s, B, C}  rule[A, B, C] ⊗ left[i, s, B] ⊗ right[i, s, C]

(``"abc,isb,isc->ia"``; ``i`` = span start, ``s`` = split point, ``left[i, s]`` = the chart of
``i : i+s+1`` and ``right[i, s]`` = the chart of ``i+s+1 : i+w``).  With ``N`` nonterminals the
binary-rule tensor holds ``N³`` numbers, by far the largest operand.  Here it is split over the
processes of a :class:`~torch.distributed.device_mesh.DeviceMesh`, and the very same functions,
:func:`semiring_einsum.func.log_einsum` (the inside algorithm) and
:func:`semiring_einsum.func.viterbi_einsum` (the best parse), take DTensor operands:

* the rule tensor is ``Shard(1)``: it is split on the **left child** ``B``, so each rank holds
  ``N / world`` of its ``N³`` numbers.  ``B`` is a *summed* index: each rank sums (maxes) over
  its own children only, and the ranks' partial charts are combined with the semiring's ⊕;
* the charts are ``Replicate()``: every rank holds the whole chart (``N`` numbers per span, tiny
  next to the rules).  The left chart holds ``B`` too, and a replicated operand is cut to the
  rank's own slice of ``B`` locally, for free; the right chart (``C``) is used whole.  Each
  width's result is replicated again after the combine, ready for the next width.

What one span width costs, forward (counted below with ``CommDebugMode``):

* inside (log semiring): **2 all-reduces**, a MAX of the partial log scores, then a SUM of their
  ``exp`` shifted by that maximum (a log-sum-exp that never overflows);
* Viterbi (max-plus with backpointers): **2 all-reduces**, a MAX of the partial scores (exact:
  on an order-preserving integer image of the floats), then a MIN of the winners' global
  row-major positions of ``(B, C, s)``, so the backpointers, ties included, are those of one
  process.

Each all-reduce carries the width's result, ``starts × N`` numbers, whatever the size of the
``N³`` rules.  Sharding the parent ``A`` instead (``Shard(0)``: an output index) needs no
combine, but leaves each width's result sharded on ``A``, while the wider spans read it whole as
a child: 2 all-gathers per width from width 3 on, of the left and right charts (``w - 1``
split points each, so more data than the result).

The expected rule counts are the gradient of the inside log probability with respect to the
log rule probabilities (the outside algorithm, by reverse mode).  The gradient of the sharded
rule tensor stays sharded: each rank gets the counts of its own rules.  The backward pass
communicates too, for the charts: the left chart's gradient slices are gathered back (it was
cut to the rank's slice of ``B``) and the right chart's partial gradients are summed (it was
used whole by every rank); its collectives are counted and printed as well.

Every rank builds the same random grammar and sentences from a fixed seed and also computes
every answer on one process with plain tensors (the same functions): the inside log
probabilities and expected rule counts must agree closely, the Viterbi scores and every
backpointer exactly.  (A real job would build only its shard of the rules; here the full tensor
is kept for the check.)  Only rank 0 prints; every rank checks, and any failed check stops the
job with a non-zero exit status.

    torchrun --nproc-per-node 2 examples/distributed_cky.py            # default sizes
    python examples/distributed_cky.py --small    # relaunches itself under torchrun, 2 ranks

It runs on CPU with the gloo backend; without ``torchrun`` (no ``RANK`` in the environment)
it starts ``python -m torch.distributed.run --standalone --nproc-per-node 2`` on itself, shows
the ranks' output and exits non-zero if they do.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from semiring_einsum import func

Tensor = torch.Tensor
Tree = tuple  # (A, word) for a leaf, (A, left, right) for a binary node
Contract = Callable[[Tensor, Tensor, Tensor], Tensor]
Counts = dict[str, int]  # collective name -> how many ran
ROOT = 0
EQUATION = "abc,isb,isc->ia"  # rule[A,B,C], left[start, split, B], right[start, split, C]
WORLD = 2  # processes started when the script relaunches itself


def say(text: str) -> None:
    """Print on rank 0 only (everywhere when no process group is running)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails (on any rank)."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    say(f"ok: {what}")


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def full(x: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for a sharded DTensor)."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def random_grammar(
    nonterminals: int, words: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Log probabilities of binary rules ``[A, B, C]`` and lexical rules ``[A, w]``.

    For each ``A`` the probabilities of all its rules, binary and lexical, sum to one.
    """
    n = nonterminals
    logits = torch.randn(n, n * n + words, generator=generator, dtype=torch.float64)
    log_p = logits.log_softmax(-1)
    return log_p[:, : n * n].reshape(n, n, n), log_p[:, n * n :]


def chart_parse(
    contract: Contract, binary: Tensor, lexical: Tensor, sentence: list[int]
) -> dict[tuple[int, int], Tensor]:
    """Fill the CKY chart bottom-up: ``chart[i, k]`` is a vector over nonterminals.

    The same code for plain tensors and DTensors: indexing and stacking replicated DTensors
    runs locally on every rank.
    """
    n = len(sentence)
    chart = {(i, i + 1): lexical[:, w] for i, w in enumerate(sentence)}
    for width in range(2, n + 1):
        starts = range(n - width + 1)
        left = torch.stack(
            [torch.stack([chart[i, i + s] for s in range(1, width)]) for i in starts]
        )
        right = torch.stack(
            [torch.stack([chart[i + s, i + width] for s in range(1, width)]) for i in starts]
        )
        spans = contract(binary, left, right)  # starts x nonterminals
        for i in starts:
            chart[i, i + width] = spans[i]
    return chart


def comm_counts(mode: CommDebugMode) -> Counts:
    """The collectives a ``CommDebugMode`` saw, by short name (``all_reduce``, ...)."""
    return {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items() if n}


def metered(contract: Contract, comms: dict[int, Counts]) -> Contract:
    """``contract``, recording the collectives of each call under its span width."""

    def run(rule: Tensor, left: Tensor, right: Tensor) -> Tensor:
        with CommDebugMode() as mode:
            spans = contract(rule, left, right)
        comms[left.shape[1] + 1] = comm_counts(mode)
        return spans

    return run


def inside(
    binary: Tensor, lexical: Tensor, sentence: list[int]
) -> tuple[Tensor, dict[int, Counts]]:
    """log p(sentence) (the log semiring), and the collectives of each span width."""
    comms: dict[int, Counts] = {}
    step = metered(lambda *xs: func.log_einsum(EQUATION, *xs), comms)
    chart = chart_parse(step, binary, lexical, sentence)
    return chart[0, len(sentence)][ROOT], comms


class Parse(NamedTuple):
    """The Viterbi parse of one sentence."""

    score: Tensor  # log probability of the best tree
    tree: Tree
    pointers: dict[int, Tensor]  # span width -> argmax[start, A] = (B, C, split)
    comms: dict[int, Counts]  # span width -> collectives of its einsum


def best_parse(binary: Tensor, lexical: Tensor, sentence: list[int]) -> Parse:
    """The best tree and its score, from Viterbi backpointers (max-plus semiring)."""
    pointers: dict[int, Tensor] = {}

    def viterbi(rule: Tensor, left: Tensor, right: Tensor) -> Tensor:
        values, argmax = func.viterbi_einsum(EQUATION, rule, left, right)
        # argmax[i, A] = (B, C, s): the summed indices in order of first appearance
        pointers[left.shape[1] + 1] = argmax
        return values

    comms: dict[int, Counts] = {}
    n = len(sentence)
    chart = chart_parse(metered(viterbi, comms), binary, lexical, sentence)
    whole = {width: full(argmax) for width, argmax in pointers.items()}

    def build(i: int, k: int, a: int) -> Tree:
        if k == i + 1:
            return (a, sentence[i])
        b, c, s = whole[k - i][i, a].tolist()
        j = i + s + 1
        return (a, build(i, j, b), build(j, k, c))

    return Parse(chart[0, n][ROOT], build(0, n, ROOT), whole, comms)


def describe(comms: dict[int, Counts]) -> str:
    """The collectives of one chart, grouped: ``all_reduce x2 at widths 2,3,4``."""
    widths: dict[str, list[int]] = {}
    for width, counts in comms.items():
        key = " + ".join(f"{op} x{n}" for op, n in counts.items()) or "none"
        widths.setdefault(key, []).append(width)
    return "; ".join(f"{key} at widths {','.join(map(str, ws))}" for key, ws in widths.items())


def nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def run_rank(small: bool, mesh: DeviceMesh) -> None:
    """One rank's work: every rank runs every line (the collectives need all of them)."""
    world = mesh.size()
    gen = torch.Generator().manual_seed(0)
    nonterminals, words, lengths = (8, 6, (5, 4)) if small else (48, 20, (10, 8, 12))
    binary, lexical = random_grammar(nonterminals, words, gen)
    sentences = [torch.randint(words, (n,), generator=gen).tolist() for n in lengths]

    # src_data_rank=None: every rank has the same full tensor and keeps its own slice.
    rule = distribute_tensor(binary, mesh, [Shard(1)], src_data_rank=None)
    rule.requires_grad_()
    lex = distribute_tensor(lexical, mesh, [Replicate()], src_data_rank=None)
    mine, whole = nbytes(rule.to_local()), nbytes(binary)
    say(
        f"{world} ranks, {nonterminals} nonterminals; rule tensor {tuple(rule.shape)} "
        f"{rule.placements}: {mine} of {whole} bytes on each rank "
        f"(local shard {tuple(rule.to_local().shape)})"
    )
    slab = nbytes(binary[:, 0])  # the rules of one left child B
    check(abs(mine * world - whole) < slab * world, f"each rank holds about 1/{world} of the rules")

    reference = binary.clone().requires_grad_()
    log_zs, reference_log_zs = [], []
    for sentence in sentences:
        say(f"sentence {sentence}")
        log_z, comms = inside(rule, lex, sentence)
        reference_log_z, _ = inside(reference, lexical, sentence)
        log_zs.append(log_z)
        reference_log_zs.append(reference_log_z)
        say(f"  inside collectives: {describe(comms)}")
        check(
            all(c == {"all_reduce": 2} for c in comms.values()),
            f"inside: 2 all-reduces per span width ({len(comms)} widths)",
        )
        value = full(log_z)
        say(f"  log p(sentence) = {value.item():.12f}")
        check(close(value, reference_log_z.detach()), "inside log Z equals one process")

        parse = best_parse(rule, lex, sentence)
        reference_parse = best_parse(binary, lexical, sentence)
        say(f"  Viterbi collectives: {describe(parse.comms)}")
        check(
            all(c == {"all_reduce": 2} for c in parse.comms.values()),
            f"Viterbi: 2 all-reduces per span width ({len(parse.comms)} widths)",
        )
        score = full(parse.score)
        say(f"  best tree log p = {score.item():.12f}: {parse.tree}")
        check(torch.equal(score, reference_parse.score), "Viterbi score is bit-identical")
        check(
            parse.pointers.keys() == reference_parse.pointers.keys()
            and all(torch.equal(parse.pointers[w], p) for w, p in reference_parse.pointers.items()),
            "every Viterbi backpointer equals one process",
        )
        check(parse.tree == reference_parse.tree, "best tree equals one process")

    # Expected rule counts of all sentences at once: d (Σ log p(sentence)) / d rules.
    with CommDebugMode() as mode:
        torch.stack(log_zs).sum().backward()
    backward = comm_counts(mode)
    torch.stack(reference_log_zs).sum().backward()
    grad = rule.grad
    assert isinstance(grad, DTensor) and reference.grad is not None
    say(f"backward collectives (all sentences, all widths): {backward}")
    # Width 2 reads only the lexical chart (no gradient); each wider one sends its left chart's
    # gradient slices back (an all-gather) and sums its right chart's partial gradients.
    wider = sum(n - 2 for n in lengths)
    check(
        backward == {"all_reduce": wider, "all_gather_into_tensor": wider},
        f"backward: 1 all-reduce + 1 all-gather per span width past 2 ({wider} widths)",
    )
    check(
        tuple(grad.placements) == (Shard(1),),
        f"the rule counts stay sharded like the rules: {grad.placements}",
    )
    counts = grad.full_tensor()  # a collective: every rank calls it
    check(close(counts, reference.grad), "expected rule counts equal one process")
    binary_nodes = sum(n - 1 for n in lengths)
    check(
        close(counts.sum(), torch.tensor(binary_nodes, dtype=counts.dtype)),
        f"the expected counts add up to the {binary_nodes} binary nodes of the trees",
    )


def relaunch(argv: list[str]) -> None:
    """Run this script under ``torch.distributed.run`` with 2 processes; show its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(WORLD), os.path.abspath(__file__), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun would set, minus its warning
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    print(done.stdout, end="")
    if done.returncode != 0:
        found = [line for line in done.stderr.splitlines() if "MISMATCH" in line]
        if found:
            raise SystemExit(found[0][found[0].index("MISMATCH") :])
        tail = "\n".join(done.stderr.splitlines()[-30:])
        raise SystemExit(f"torchrun exited with status {done.returncode}:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        relaunch(argv)
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        run_rank(args.small, init_device_mesh("cpu", (dist.get_world_size(),)))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
