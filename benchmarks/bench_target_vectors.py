"""Batched target vectors: 8 STEAM-ROME objectives of one request optimised together
(:func:`steamviz.edit.rome.compute_vs`) vs one at a time (:func:`steamviz.edit.rome.compute_v`).

Same request (the first default edit), same prepared rows, lambdas 1 ... 200, default
alignment layers, 25 steps each (no early stop), float32 (``--matmul-dtype bfloat16``: the
blocks' products in bfloat16). Baseline: the 8 objectives one after the other, in the same
run. It also prints the machine's matrix-product throughput at the batched and the single
row counts (the ceiling of what batching can buy: see docs/results.md).
Run: python benchmarks/bench_target_vectors.py [--matmul-dtype bfloat16].
Last line: the ratio batched / one at a time.
"""

import argparse
import time

import torch

from steamviz import rome, steam
from steamviz.look.anchors import build_anchor
from steamviz.data.datasets import load_named
from steamviz.core.models import load_model

LAMS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]


def throughput(rows: int, d: int, hidden: int, dtype: torch.dtype, reps: int = 50) -> float:
    """GFLOP/s of ``[rows x d] @ [d x hidden]`` in ``dtype`` on this machine."""
    a, b = torch.randn(rows, d, dtype=dtype), torch.randn(d, hidden, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * rows * d * hidden * reps / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matmul-dtype", default=None, choices=["bfloat16", "float16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    req = load_named("default", 1)[0]
    hp = rome.ROMEHparams.for_model(lm).replace(early_stop_loss=0.0,
                                                v_matmul_dtype=args.matmul_dtype)
    prep = rome.prepare(lm, req, hp)
    anchor = build_anchor(lm, req.target_new, exclude_subjects=(req.subject,))
    layers = steam.default_layers(lm, hp.block)
    aligns = [steam.make_align(lm, anchor, lam, layers) for lam in LAMS]
    rome.compute_v(lm, prep, hp.replace(v_num_grad_steps=2), align=aligns[0])  # warm-up
    rows = prep.h_suffix.shape[0] * prep.h_suffix.shape[1]
    dt = getattr(torch, args.matmul_dtype or "float32")
    cfg = lm.model.config
    for n in (rows, rows * len(LAMS)):
        print(f"matrix products [{n} x {cfg.hidden_size}] @ [{cfg.hidden_size} x "
              f"{cfg.intermediate_size}] in {dt}: "
              f"{throughput(n, cfg.hidden_size, cfg.intermediate_size, dt):.0f} GFLOP/s")
    t = time.perf_counter()
    one = [rome.compute_v(lm, prep, hp, align=a) for a in aligns]
    single = time.perf_counter() - t
    t = time.perf_counter()
    many = rome.compute_vs(lm, prep, hp, aligns)
    batched = time.perf_counter() - t
    worst = max(float((m.delta - o.delta).norm() / o.delta.norm()) for m, o in zip(many, one))
    print(f"{len(LAMS)} target vectors, {hp.v_num_grad_steps} steps, rows "
          f"{tuple(prep.h_suffix.shape[:2])}: one at a time {single:.1f} s, batched "
          f"{batched:.1f} s; largest relative difference {worst:.1e}")
    print("ratio batched / one at a time:")
    print(f"{batched / single:.3f}")


if __name__ == "__main__":
    main()
