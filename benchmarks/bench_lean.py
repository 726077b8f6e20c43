"""The lean forward (steamviz.core.lean) on both offline models: seconds of one v*
optimisation through the lean blocks vs through transformers' modules, same request, rows and
steps, in the same run.

SmolLM2-135M (llama) and Gemma 3 270M (gemma3_text: (1 + w) norms, q/k norms, a rotary per
layer type; install its packages first, see README "The default model, offline"). The first
default edit, ROME's default hyperparameters for each model, 25 steps (no early stop), float32.
Also prints the relative difference between the two paths' v* (they compute the same
arithmetic). Run: python benchmarks/bench_lean.py. Last line: Gemma's speed-up (modules /
lean) divided by SmolLM2's -- 1.0 means the second model gains what the first does.
"""

import time

import torch

from steamviz.core.models import load_model
from steamviz.data.datasets import load_named
from steamviz.edit import rome


def speedup(name) -> float:
    torch.manual_seed(0)
    lm = load_model(name, device="cpu")
    req = load_named("default", 1)[0]
    hp = rome.ROMEHparams.for_model(lm).replace(early_stop_loss=0.0)
    prep = rome.prepare(lm, req, hp)
    for lean in (False, True):  # warm-up
        rome.compute_v(lm, prep, hp.replace(v_num_grad_steps=2), lean=lean)
    best, v = {}, {}
    for lean in (False, True, False, True):
        t = time.perf_counter()
        v[lean] = rome.compute_v(lm, prep, hp, lean=lean)
        best[lean] = min(best.get(lean, float("inf")), time.perf_counter() - t)
    rel = float((v[True].delta - v[False].delta).norm() / v[False].delta.norm())
    print(f"{lm.name} ({lm.model.config.model_type}, block {hp.block}, rows "
          f"{tuple(prep.h_suffix.shape[:2])}): modules {best[False]:.2f} s, lean {best[True]:.2f} s, "
          f"speed-up {best[False] / best[True]:.2f}x; v* relative difference {rel:.1e}")
    return best[False] / best[True]


def main():
    small = speedup(None)
    gemma = speedup("gemma3-270m")
    print("Gemma 3 270M speed-up / SmolLM2 speed-up:")
    print(f"{gemma / small:.3f}")


if __name__ == "__main__":
    main()
