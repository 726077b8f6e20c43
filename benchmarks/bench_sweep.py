"""A sweep over 8 lambda values for one edit vs 8 independent STEAM-ROME edits.

sweep: run_sweep on one request with lams = 8 values (unedited measured once; context
prompts, keys, lower-block caches, anchors and the reference bank computed once).
independent: 8 separate experiments, each starting from empty in-process caches (context
prompts, ROME preparation, anchors, recall checks): measure unedited, edit, measure.
Both use the same settings (generation off, bank of 400 facts, on-disk caches warm).
Run: python benchmarks/bench_sweep.py. Target (#20): ratio sweep / independent <= 0.4 (the
sweep optimises the 8 target vectors together: steamviz.edit.rome.compute_vs).
Last line: the ratio.
"""

import shutil
import tempfile
import time

import torch

from steamviz import anchors, context
from steamviz.core.models import load_model
from steamviz.run.sweep import Runner, SweepConfig, run_sweep
from steamviz.core.memo import clear_caches

LAMS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]


def clear():
    clear_caches("rome")
    anchors._RECALL.clear()
    anchors._ANCHORS.clear()
    context._CACHE.clear()


def main():
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    base = dict(n_edits=1, methods=["steam-rome"], lams=LAMS, generation=False, bank_size=400)
    # warm the on-disk caches (bank, anchors) so neither side pays for them
    run_sweep(SweepConfig(**dict(base, lams=[1.0])), tempfile.mkdtemp(), lm=lm, progress=False,
              log=lambda *a: None)

    clear()
    d = tempfile.mkdtemp()
    t = time.perf_counter()
    run_sweep(SweepConfig(**base), d, lm=lm, progress=False, log=lambda *a: None)
    sweep = time.perf_counter() - t
    shutil.rmtree(d)

    t = time.perf_counter()
    for lam in LAMS:
        clear()
        cfg = SweepConfig(**dict(base, lams=[lam]))
        r = Runner(cfg, lm=lm)
        req = r.requests()[0]
        r.run_point(req, dict(method="unedited", block=None, lam=None, align_layers=None,
                              centered=None))
        r.run_point(req, dict(method="steam-rome", block=r.hp.block, lam=lam,
                              align_layers="default", centered=False))
    indep = time.perf_counter() - t
    print(f"sweep of {len(LAMS)} lambdas: {sweep:.1f} s; {len(LAMS)} independent edits: "
          f"{indep:.1f} s")
    print("ratio sweep / independent:")
    print(f"{sweep / indep:.3f}")


if __name__ == "__main__":
    main()
