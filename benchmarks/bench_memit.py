"""Seconds per edit: one MEMIT batch of N edits against N single ROME edits, in one run.

Default edit set (data/edits.jsonl), first N requests (default 50), default model and
hyperparameters of each method (ROME: block 5; MEMIT: blocks 3-7), early stopping on as in
normal use. Both start from empty in-process caches; the model is restored between sides.
- memit: ``memit.apply(lm, requests)``: N target vectors, then one least-squares update of
  each of the 5 blocks.
- rome: N independent ``rome.apply`` edits, each restored before the next (single edits,
  as an evaluation of single edits runs them).
Each side also reports its efficacy on the edited requests (rewrite prompt, P(new) > P(true)),
measured while the edit(s) are in place.
Run: python benchmarks/bench_memit.py [--edits 50]. Last line: the ratio
(MEMIT seconds per edit) / (ROME seconds per edit).
"""

import argparse
import resource
import time

import torch

from steamviz import memit, rome
from steamviz.data.datasets import load_edits
from steamviz.measure.metrics import efficacy_records
from steamviz.core.models import load_model
from steamviz.core.memo import clear_caches


def eff(lm, reqs) -> float:
    return sum(efficacy_records(lm, r)[0]["success"] for r in reqs) / len(reqs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    reqs = load_edits(limit=args.edits)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}

    clear_caches("rome")
    t = time.perf_counter()
    hits = 0
    for r in reqs:
        with rome.apply(lm, r):
            hits += efficacy_records(lm, r)[0]["success"]
    rome_s = (time.perf_counter() - t) / len(reqs)
    print(f"ROME: {len(reqs)} single edits, {rome_s:.2f} s per edit (incl. one efficacy "
          f"check each), efficacy {hits / len(reqs):.2f}", flush=True)
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())

    clear_caches("rome")
    clear_caches("memit")
    t = time.perf_counter()
    with memit.apply(lm, reqs):
        t_edit = time.perf_counter() - t
        e = eff(lm, reqs)
    memit_s = (time.perf_counter() - t) / len(reqs)
    print(f"MEMIT: one batch of {len(reqs)}, {memit_s:.2f} s per edit ({t_edit:.1f} s to edit, "
          f"incl. the efficacy checks {memit_s * len(reqs):.1f} s), efficacy {e:.2f}")
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("MEMIT seconds per edit / ROME seconds per edit:")
    print(f"{memit_s / rome_s:.3f}")


if __name__ == "__main__":
    main()
