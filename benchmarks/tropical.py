"""Max-plus, Viterbi and max-plus forward+backward: ours before, ours now, tropical-gemm.

    python benchmarks/tropical.py OLD [--rounds 5] [--reps 15] [--no-memory] [--inductor]

``OLD`` is a git revision (checked out into a temporary worktree); "now" is the working
tree, and "fallback" the working tree with ``SEMIRING_EINSUM_NATIVE=0`` (what runs without a
C compiler).  Every round runs one fresh subprocess per tree, in a seeded random order, each
timing every case (median of ``--reps`` calls after a warm-up); the table shows the median
over rounds.  The working tree's subprocess also times tropical-gemm (when installed: its
``maxplus_matmul`` for values, ``maxplus_matmul[_batched]_with_argmax`` for Viterbi and its
PyTorch autograd layer for forward+backward) and a plain-torch broadcast ``amax`` loop for the
HMM recurrence, and checks that ours and tropical-gemm agree (values, and argmax on these
tie-free inputs).  With ``--inductor`` it also times ``torch.compile`` (inductor) of the
plain-torch broadcast ``amax`` (``max`` with indices for Viterbi; its autograd for
forward+backward).  Unless ``--no-memory``, the peak extra memory (``ru_maxrss`` growth) of a
few cases is measured in a fresh subprocess per tree and case.  float32, the machine's threads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_commits import ROOT, worktree

CHILD = r"""
import json, statistics, sys, time
import torch
from semiring_einsum import func

reps, with_peer, inductor = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
tg = tgp = None
if with_peer:
    try:
        import tropical_gemm as tg
        from tropical_gemm import pytorch as tgp
    except ImportError:
        tg = None

def timed(call):
    for _ in range(2):
        call()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)

def fwd_bwd(fn, xs):
    def call():
        fn(*xs).sum().backward()
        for x in xs:
            x.grad = None
    return call

out = {}
g = torch.Generator().manual_seed(0)
for label, eq, shapes in [
    ("n=128", "ij,jk->ik", [(128, 128), (128, 128)]),
    ("n=256", "ij,jk->ik", [(256, 256), (256, 256)]),
    ("n=512", "ij,jk->ik", [(512, 512), (512, 512)]),
    ("b=8 n=128", "bij,bjk->bik", [(8, 128, 128), (8, 128, 128)]),
]:
    a, b = (torch.randn(s, generator=g) for s in shapes)
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
    out[f"values {label}"] = {"ours": timed(lambda: func.max_einsum(eq, a, b))}
    out[f"viterbi {label}"] = {"ours": timed(lambda: func.viterbi_einsum(eq, a, b))}
    out[f"fwd+bwd {label}"] = {
        "ours": timed(fwd_bwd(lambda x, y: func.max_einsum(eq, x, y), [la, lb]))
    }
    if inductor:
        import warnings
        warnings.simplefilter("ignore")
        def broadcast(x, y):
            return x.unsqueeze(-1) + y.unsqueeze(-3)
        values_c = torch.compile(lambda x, y: broadcast(x, y).amax(-2), fullgraph=True)
        viterbi_c = torch.compile(lambda x, y: broadcast(x, y).max(-2), fullgraph=True)
        out[f"values {label}"]["inductor"] = timed(lambda: values_c(a, b))
        out[f"viterbi {label}"]["inductor"] = timed(lambda: viterbi_c(a, b))
        out[f"fwd+bwd {label}"]["inductor"] = timed(fwd_bwd(values_c, [la, lb]))
    if tg is None:
        continue
    an, bn = a.numpy(), b.numpy()
    batched = a.dim() == 3
    values = (lambda: tgp.tropical_maxplus_matmul_batched(a, b)) if batched else (
        lambda: tg.maxplus_matmul(an, bn))
    viterbi = tg.maxplus_matmul_batched_with_argmax if batched else tg.maxplus_matmul_with_argmax
    product = tgp.tropical_maxplus_matmul_batched if batched else tgp.tropical_maxplus_matmul
    out[f"values {label}"]["peer"] = timed(values)
    out[f"viterbi {label}"]["peer"] = timed(lambda: viterbi(an, bn))
    out[f"fwd+bwd {label}"]["peer"] = timed(fwd_bwd(product, [la, lb]))
    # Same answers: values, and the argmax (no ties in these random inputs).
    v, i = func.viterbi_einsum(eq, a, b)
    pv, pi = viterbi(an, bn)
    assert torch.equal(v.reshape(-1), torch.from_numpy(pv).reshape(-1)), label
    assert torch.equal(i.reshape(-1), torch.from_numpy(pi).long().reshape(-1)), label

# The Viterbi HMM recurrence: 32 calls of bi,ij,bj->bj (values), b=16, n=128.
alpha, trans, emit = (torch.randn(s, generator=g) for s in [(16, 128), (128, 128), (16, 128)])
def recurrence(step):
    def call():
        x = alpha
        for _ in range(32):
            x = step(x)
        return x
    return call
hmm = {"ours": timed(recurrence(lambda x: func.max_einsum("bi,ij,bj->bj", x, trans, emit)))}
if with_peer:
    hmm["naive"] = timed(recurrence(lambda x: (x[:, :, None] + trans).amax(1) + emit))
    if tg is not None:
        hmm["peer"] = timed(recurrence(lambda x: tgp.tropical_maxplus_matmul(x, trans) + emit))
out["HMM 32 steps b=16 n=128"] = hmm
print(json.dumps(out))
"""

MEMORY_CHILD = r"""
import resource, sys, torch
from semiring_einsum import func
case = sys.argv[1]
g = torch.Generator().manual_seed(0)
eq, shapes = {
    "values n=512": ("ij,jk->ik", [(512, 512), (512, 512)]),
    "viterbi b=8 n=128": ("bij,bjk->bik", [(8, 128, 128), (8, 128, 128)]),
    "fwd+bwd n=256": ("ij,jk->ik", [(256, 256), (256, 256)]),
}[case]
xs = [torch.randn(s, generator=g).requires_grad_(case.startswith("fwd")) for s in shapes]
fn = func.viterbi_einsum if case.startswith("viterbi") else func.max_einsum
func.max_einsum("ij,jk->ik", torch.zeros(2, 2), torch.zeros(2, 2))  # build/load the kernel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fn(eq, *xs)
if case.startswith("fwd"):
    out.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
MEMORY_CASES = ("values n=512", "viterbi b=8 n=128", "fwd+bwd n=256")


def _child(src: Path, code: str, *args: str, native: bool = True) -> str:
    env = {"PYTHONPATH": str(src / "src"), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    if not native:
        env["SEMIRING_EINSUM_NATIVE"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env
    )
    return done.stdout.strip().splitlines()[-1]


def _cell(x: float | None) -> str:
    return f"{x:>9.3f}" if x is not None else f"{'-':>9}"


def _ratio(now: float, x: float | None) -> str:
    return f"{now / x:>8.2f}x" if x else f"{'-':>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="the git revision of 'ours before'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--inductor", action="store_true", help="also time inductor's code")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"old": [], "new": [], "fallback": []}
    memory: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": worktree(args.old, Path(tmp)), "new": ROOT, "fallback": ROOT}
        try:
            order = list(trees)
            rng = random.Random(0)
            for r in range(args.rounds):
                rng.shuffle(order)
                for name in order:
                    peer = "1" if name == "new" else "0"
                    inductor = "1" if name == "new" and args.inductor else "0"
                    got = _child(
                        trees[name],
                        CHILD,
                        str(args.reps),
                        peer,
                        inductor,
                        native=name != "fallback",
                    )
                    runs[name].append(json.loads(got))
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            if not args.no_memory:
                for case in MEMORY_CASES:
                    memory[case] = {
                        name: float(_child(tree, MEMORY_CHILD, case, native=name != "fallback"))
                        for name, tree in trees.items()
                    }
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["old"])],
                check=False,
            )

    def med(name: str, case: str, who: str) -> float | None:
        got = [run[case][who] for run in runs[name] if who in run.get(case, {})]
        return statistics.median(got) if got else None

    print(f"old {args.old}, now = working tree; median ms of {args.rounds} rounds")
    head = (
        f"{'case':<26} {'before':>9} {'fallback':>9} {'now':>9} {'peer':>9} {'inductor':>9} "
        f"{'naive':>9} {'now/before':>10} {'now/peer':>9} {'now/ind.':>9} {'now/naive':>9}"
    )
    print(head)
    print("-" * len(head))
    for case in runs["new"][0]:
        now = med("new", case, "ours")
        assert now is not None
        before, fallback = med("old", case, "ours"), med("fallback", case, "ours")
        peer, inductor = med("new", case, "peer"), med("new", case, "inductor")
        naive = med("new", case, "naive")
        line = f"{case:<26} " + " ".join(
            _cell(x) for x in (before, fallback, now, peer, inductor, naive)
        )
        line += f" {_ratio(now, before):>10} {_ratio(now, peer)} {_ratio(now, inductor)}"
        line += f" {_ratio(now, naive)}"
        print(line)
    if memory:
        print("\nPeak extra memory (MiB, ru_maxrss growth in a fresh process)")
        for case, got in memory.items():
            print(
                f"{case:<26} before {got['old']:>7.1f}   fallback {got['fallback']:>7.1f}   "
                f"now {got['new']:>7.1f}"
            )


if __name__ == "__main__":
    main()
