#!/usr/bin/env python
"""Stress check of exact undo on the default model: many random cycles of ROME and MEMIT
edits (1-4 at a time, on shared matrices) applied, then restored in a random order; after
every cycle the edited matrices must be bit for bit where they started.

    python scripts/restore_cycles.py --cycles 1000          # SmolLM2, a few steps per edit

Each request's target vectors are optimised once (few steps) and reused by later cycles, so a
cycle costs the weight updates and restores, not the optimisation. Prints one line per 100
cycles and, last, the number of cycles that ended exactly at the start.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from steamviz import memit, rome
from steamviz.data.datasets import load_edits
from steamviz.core.guard import active_edits
from steamviz.core.models import load_model


def snapshot(model, names):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memit-share", type=float, default=0.15,
                    help="share of edits made with MEMIT (each computes its keys again)")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    reqs = load_edits(limit=args.requests)
    hp = rome.ROMEHparams.for_model(lm).replace(
        v_num_grad_steps=args.steps, context_template_length_params=((5, 2),))
    mhp = memit.MEMITHparams.for_model(lm)
    mhp = mhp.replace(v_num_grad_steps=args.steps, context_template_length_params=((5, 2),),
                      blocks=tuple(mhp.blocks[-2:]))
    touched = {lm.adapter.mlp_out.format(b) + ".weight"
               for b in set(mhp.blocks) | {hp.block, hp.block + 1}}
    start = snapshot(lm.model, touched)
    rng = random.Random(args.seed)
    t0 = time.time()
    exact = 0
    for c in range(args.cycles):
        live = []
        for _ in range(rng.randint(1, 4)):
            kind = "memit" if rng.random() < args.memit_share else rng.choice(["rome", "rome-up"])
            r = rng.choice(reqs)
            if kind == "memit":
                e = memit.apply(lm, [r, rng.choice(reqs)] if rng.random() < 0.5 else [r], mhp)
            else:
                e = rome.apply(lm, r, hp if kind == "rome" else hp.replace(block=hp.block + 1))
            live.append(e)
        rng.shuffle(live)
        for e in live:
            e.restore()
        now = snapshot(lm.model, touched)
        ok = all(torch.equal(now[n], start[n]) for n in start) and active_edits(lm.model) == 0
        exact += ok
        if not ok:
            print(f"cycle {c}: NOT back at the start")
        if (c + 1) % 100 == 0 or c == 0:
            print(f"{c + 1} cycles, {exact} exact, {time.time() - t0:.0f} s", flush=True)
    print(f"{exact} of {args.cycles} cycles ended bit for bit at the start")
    print(exact / args.cycles)


if __name__ == "__main__":
    main()
