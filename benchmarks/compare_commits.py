"""Old commit against new commit: the benchmark workloads timed in one run, interleaved.

    python benchmarks/compare_commits.py OLD [NEW] [--rounds 8] [--reps 5] [--compiled]
                                         [--only PREFIX ...]

``OLD`` and ``NEW`` (default: the working tree) are git revisions; each is checked out into
a temporary worktree.  Every round runs one fresh subprocess per tree, in a seeded random
order, each timing ``semiring_einsum.func`` on every workload of ``python -m semiring_einsum
--full`` (the "ours" column: the same equations, sizes, modes and inputs) and the per-call cost
on tiny inputs; the table shows the median over rounds of each subprocess's median, and
new / old.  Only the public ``func`` API is used, so any two commits compare.  With
``--compiled``, the cases of ``compile_ratio.py`` (five semirings, three workloads, forward and
forward+backward) are timed under ``torch.compile`` instead.  ``--only`` keeps the cases
whose key starts with one of the given prefixes (``tiny``, ``log-``, ``viterbi-bmm``, ...).
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

ROOT = Path(__file__).resolve().parents[1]

# The timing child: self-contained, so that it runs against either tree's package.
CHILD = r"""
import json, statistics, sys, time
import torch
from semiring_einsum import func

reps = int(sys.argv[1])
only = tuple(sys.argv[2:])

def bmm(b, n): return {"b": b, "i": n, "j": n, "k": n}
def chain(n): return {"a": n, "b": n, "c": n, "d": n}
def cky(b, s, x, k): return {"b": b, "s": s, "x": x, "y": x, "z": x, "k": k}

WORKLOADS = [
    ("real-bmm", "real", "bij,bjk->bik", "fwd", bmm(8, 256), 1.0),
    ("log-bmm", "log", "bij,bjk->bik", "fwd", bmm(8, 128), 1.0),
    ("log-bmm-bwd", "log", "bij,bjk->bik", "fwd+bwd", bmm(8, 128), 1.0),
    ("log-chain-64", "log", "ab,bc,cd->ad", "fwd", chain(64), 1.0),
    ("log-chain-128", "log", "ab,bc,cd->ad", "fwd", chain(128), 1.0),
    ("log-hmm-bwd", "log", "bi,ij,bj->bj", "fwd+bwd", {"b": 64, "i": 512, "j": 512}, 1.0),
    ("log-bikl", "log", "bikl,bklj->bij", "fwd", {"b": 8, "i": 64, "j": 64, "k": 32, "l": 32}, 1.0),
    ("log-cky-bwd", "log", "bsxk,bsyk,xyz->bsz", "fwd+bwd", cky(4, 32, 24, 8), 1.0),
    ("log-adversarial", "log", "bij,bjk->bik", "fwd", bmm(8, 128), 300.0),
    ("viterbi-bmm", "viterbi", "bij,bjk->bik", "fwd", bmm(8, 128), 1.0),
    ("max-bmm", "max", "bij,bjk->bik", "fwd", bmm(8, 128), 1.0),
    ("min-bmm", "min", "bij,bjk->bik", "fwd", bmm(8, 128), 1.0),
    ("viterbi-cky", "viterbi", "bsxk,bsyk,xyz->bsz", "fwd", cky(4, 32, 24, 8), 1.0),
    ("max-bmm-bwd", "max", "bij,bjk->bik", "fwd+bwd", bmm(8, 128), 1.0),
    ("tiny-real", "real", "ij,jk->ik", "tiny", {"i": 2, "j": 3, "k": 2}, 1.0),
    ("tiny-log", "log", "ij,jk->ik", "tiny", {"i": 2, "j": 3, "k": 2}, 1.0),
    ("tiny-max", "max", "ij,jk->ik", "tiny", {"i": 2, "j": 3, "k": 2}, 1.0),
]
FUNCS = {
    "real": func.einsum, "log": func.log_einsum, "max": func.max_einsum,
    "min": func.min_einsum, "viterbi": lambda eq, *xs: func.viterbi_einsum(eq, *xs)[0],
}

out = {}
for key, semiring, eq, mode, size, spread in WORKLOADS:
    if only and not key.startswith(only):
        continue
    g = torch.Generator().manual_seed(0)
    terms = eq.split("->")[0].split(",")
    xs = [torch.randn([size[c] for c in t], generator=g) * spread for t in terms]
    fn = FUNCS[semiring]
    if mode == "fwd+bwd":
        xs = [x.requires_grad_() for x in xs]
        def call():
            fn(eq, *xs).sum().backward()
            for x in xs:
                x.grad = None
    else:
        def call():
            fn(eq, *xs)
    inner = 2000 if mode == "tiny" else 1
    for _ in range(2):
        call()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            call()
        samples.append((time.perf_counter() - start) * 1e3 / inner)
    out[key] = statistics.median(samples)
print(json.dumps(out))
"""


# The compiled child: the cases of benchmarks/compile_ratio.py, compiled (inductor,
# fullgraph=True), forward and forward+backward.
COMPILED_CHILD = r"""
import json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from semiring_einsum import func

reps = int(sys.argv[1])
only = tuple(sys.argv[2:])
WORKLOADS = {
    "bmm": ("bij,bjk->bik", [(8, 128, 128), (8, 128, 128)]),
    "hmm": ("bi,ij,bj->bj", [(64, 256), (256, 256), (64, 256)]),
    "cky": ("bsxk,bsyk,xyz->bsz", [(2, 16, 24, 8), (2, 16, 24, 8), (24, 24, 24)]),
}
FUNCS = {
    "real": func.einsum, "log": func.log_einsum, "max": func.max_einsum,
    "min": func.min_einsum, "viterbi": lambda eq, *xs: func.viterbi_einsum(eq, *xs)[0],
}
out = {}
for wname, (eq, shapes) in WORKLOADS.items():
    for sname, op in FUNCS.items():
        if only and not f"{sname}-{wname}-bwd".startswith(only):
            continue
        g = torch.Generator().manual_seed(0)
        plain = [torch.randn(s, generator=g) for s in shapes]
        leaves = [x.clone().requires_grad_() for x in plain]
        torch._dynamo.reset()
        compiled = torch.compile(lambda *xs, op=op, eq=eq: op(eq, *xs), fullgraph=True)
        def fwd():
            compiled(*plain)
        def both():
            compiled(*leaves).sum().backward()
            for x in leaves:
                x.grad = None
        for key, call in ((f"{sname}-{wname}", fwd), (f"{sname}-{wname}-bwd", both)):
            if only and not key.startswith(only):
                continue
            for _ in range(3):
                call()
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                call()
                samples.append((time.perf_counter() - start) * 1e3)
            out[key] = statistics.median(samples)
print(json.dumps(out))
"""


def worktree(rev: str, where: Path) -> Path:
    """A detached git worktree of ``rev`` in ``where`` (remove it with ``git worktree remove``)."""
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True
    )
    return path


def _time(src: Path, reps: int, compiled: bool, only: list[str]) -> dict[str, float]:
    env_path = str(src / "src")
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_CHILD if compiled else CHILD, str(reps), *only],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="the old git revision")
    parser.add_argument("new", nargs="?", help="the new git revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="time the cases of compile_ratio.py under torch.compile instead",
    )
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="PREFIX", help="only the cases with these prefixes"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": worktree(args.old, Path(tmp))}
        trees["new"] = worktree(args.new, Path(tmp)) if args.new else ROOT
        try:
            samples: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
            order = list(trees)
            rng = random.Random(0)
            for r in range(args.rounds):
                rng.shuffle(order)
                for name in order:
                    samples[name].append(_time(trees[name], args.reps, args.compiled, args.only))
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        finally:
            for path in trees.values():
                if path != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                        check=False,
                    )
    old = {k: statistics.median(s[k] for s in samples["old"]) for k in samples["old"][0]}
    new = {k: statistics.median(s[k] for s in samples["new"]) for k in samples["new"][0]}
    print(f"old {args.old}, new {args.new or 'working tree'}; median ms of {args.rounds} rounds")
    print(f"{'workload':<16} {'old':>9} {'new':>9} {'new/old':>8}")
    for key in old:
        unit = 1e3 if key.startswith("tiny") else 1.0
        label = " (us)" if unit != 1.0 else ""
        print(
            f"{key + label:<16} {old[key] * unit:>9.3f} {new[key] * unit:>9.3f} "
            f"{new[key] / old[key]:>7.2f}x"
        )


if __name__ == "__main__":
    main()
