"""The least time a finished claims run's target vectors can take on this machine.

Counts the distinct target vectors of a claims store (ROME once per case; STEAM once per
distinct anchor: seeds that drew the same facts share one vector) and their Adam steps, then
divides the matrix products those steps need by the machine's measured product throughput.
Per objective-step: 49.4 GFLOP, measured with ``torch.profiler(with_flops=True)`` on the
first default edit (22 rows x 7 suffix tokens through the 24 SmolLM2 blocks above the edit,
forward and backward; docs/results.md). Elementwise work, measurement, generation and
references come on top, so the real run is slower than this floor.

Run: python scripts/claims_floor.py docs/claims/run
"""

import argparse
import sys
from pathlib import Path

import torch

from steamviz.run.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_target_vectors import throughput  # noqa: E402

GFLOP_PER_OBJECTIVE_STEP = 395 / 8
PARTS = ("tune", "cf", "cf-centred", "port", "port-centred")


def vectors(run: Path, part: str) -> tuple[int, int]:
    """(distinct target vectors, their optimisation steps) of one part of a claims store."""
    df = Store(run / part).frame()
    if not len(df):
        return 0, 0
    n = steps = 0
    edits = df[df.method != "unedited"]
    for (_, method, _, _), g in edits.groupby(["case_id", "method", "lam", "centered"],
                                              dropna=False):
        k = 1 if method == "rome" else g.cos_centered.round(6).nunique(dropna=False)
        n += k
        steps += k * int(g.steps.iloc[0])
    return n, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a claims run folder (steamviz claims --out RUN)")
    args = ap.parse_args()
    total = 0
    for part in PARTS:
        if (args.run / part / "points").is_dir():
            n, s = vectors(args.run, part)
            total += s
            print(f"{part}: {n} target vectors, {s} objective-steps")
    rate = throughput(1232, 576, 1536, torch.float32)
    minutes = total * GFLOP_PER_OBJECTIVE_STEP / rate / 60
    print(f"{total} objective-steps x {GFLOP_PER_OBJECTIVE_STEP:.1f} GFLOP at {rate:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads, float32)")
    print("minutes of the matrix products alone (the floor):")
    print(f"{minutes:.1f}")


if __name__ == "__main__":
    main()
