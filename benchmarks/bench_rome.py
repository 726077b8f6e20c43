"""Seconds per ROME edit on this machine, against the plain implementation in the same run.

10 single edits (CounterFact val cases 0-9, default model, default hyperparameters: 21
context prompts). Early stopping is off so both run exactly ``v_num_grad_steps`` steps.
- fast: steamviz's ROME as shipped (blocks below the edited block run once, the tokens
  before the subject come from a key/value cache, the edited block's output is computed
  once, the blocks above run through steamviz.core.lean, logits only where a loss reads them),
  float32 throughout
- bf16: the same with ``v_matmul_dtype: bfloat16`` (the blocks' matrix products in
  bfloat16 on AMX; stream, norms, attention and losses stay float32) -- opt-in
- plain: the same objective computed as the ROME / EasyEdit code does (whole model every
  step, logits at every position) -- the baseline.
- steam: STEAM-ROME (lambda 20, default alignment layers) with the anchor already cached.
Peak memory (#20: at most 0.6x EasyEdit's 2.22 GiB): each path in a process of its own that
loads the model and makes one edit (the first default edit), the kernel's resident-set
high-water mark (``VmHWM``); the plain path (as ROME / EasyEdit compute v*) is the same-run
baseline. The timing process itself checks that every weight is restored through a digest,
not a copy of the weights.
Run: python benchmarks/bench_rome.py [--edits 10]. Last line: the float32 speed-up (plain / fast).
"""

import argparse
import hashlib
import resource
import statistics
import subprocess
import sys
import time

import torch

from steamviz import rome, steam
from steamviz.look.anchors import AnchorError, build_anchor
from steamviz.data.datasets import load_counterfact
from steamviz.core.models import load_model
from steamviz import fetch
from steamviz.core.memo import clear_caches


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def digest(model) -> str:
    """A hash of every weight's bytes (read in place: no copy of the model)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().contiguous()
        h.update((t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy())
    return h.hexdigest()


CHILD = r'''
import sys
from steamviz.core.models import load_model
from steamviz.data.datasets import load_named
from steamviz.edit import rome

lm = load_model(device="cpu")
req = load_named("default", 1)[0]
hp = rome.ROMEHparams.for_model(lm)
prep = rome.prepare(lm, req, hp)
v = (rome.compute_v if sys.argv[1] == "fast" else rome.compute_v_reference)(lm, prep, hp)
rome.write_update(lm, prep, v).restore()
print(next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")))
'''
EASYEDIT_GIB = 2.22  # EasyEdit's ROME, peak RSS measured for #20 (not re-run here)


def peak_of(kind: str) -> float:
    """MiB: the high-water mark of a process that loads the model and edits once."""
    out = subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--data", default="default", choices=["default", "counterfact"],
                    help="default: data/edits.jsonl (their new objects have anchors)")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    from steamviz.data.datasets import load_edits

    reqs = load_counterfact(fetch.path("counterfact", "counterfact_easyedit/counterfact-val.json"),
                            limit=args.edits) if args.data == "counterfact" else load_edits(
                                limit=args.edits)
    hp = rome.ROMEHparams.for_model(lm).replace(early_stop_loss=0.0)
    state = digest(lm.model)
    hp_bf = hp.replace(v_matmul_dtype="bfloat16")
    rows = {"fast": [], "bf16": [], "plain": [], "steam": []}
    agree = []
    mem0 = peak_mb()
    for i, req in enumerate(reqs):
        try:
            anchor = build_anchor(lm, req.target_new)  # cached before timing
        except AnchorError:
            anchor = None
        for kind in ("fast", "bf16", "plain", "steam"):
            if kind == "steam" and anchor is None:
                continue
            clear_caches("rome")
            t = time.perf_counter()
            prep = rome.prepare(lm, req, hp_bf if kind == "bf16" else hp, use_cache=False)
            if kind == "steam":
                align = steam.make_align(lm, anchor, 20.0, steam.default_layers(lm, hp.block))
                v = rome.compute_v(lm, prep, hp, align=align)
            elif kind == "bf16":
                v = rome.compute_v(lm, prep, hp_bf)
            else:
                v = (rome.compute_v if kind == "fast" else rome.compute_v_reference)(lm, prep, hp)
            edit = rome.write_update(lm, prep, v)
            rows[kind].append(time.perf_counter() - t)
            edit.restore()
            if kind == "fast":
                mem_fast = peak_mb()
                v_fast = v.delta
            if kind in ("bf16", "plain"):
                agree.append((kind, float(torch.cosine_similarity(v.delta, v_fast, 0)),
                              float((v.delta - v_fast).norm() / v_fast.norm())))
        st = f", steam {rows['steam'][-1]:.2f} s" if anchor is not None else ""
        print(f"edit {i}: fast {rows['fast'][-1]:.2f} s, bf16 {rows['bf16'][-1]:.2f} s, "
              f"plain {rows['plain'][-1]:.2f} s{st} "
              f"({v.steps + 1} forward passes, {len(prep.contexts)} context prompts)")
    assert digest(lm.model) == state, "a weight was not restored"
    f, p = statistics.median(rows["fast"]), statistics.median(rows["plain"])
    b = statistics.median(rows["bf16"])
    print(f"median seconds per edit: fast {f:.2f}, bf16 {b:.2f}, plain {p:.2f}; "
          f"speed-up fast {p / f:.2f}x, bf16 {p / b:.2f}x")
    for kind in ("plain", "bf16"):
        cs = [c for k, c, _ in agree if k == kind]
        rel = [r for k, _, r in agree if k == kind]
        print(f"delta vs fast: {kind} min cosine {min(cs):.5f}, max relative difference "
              f"{max(rel):.2e}")
    if rows["steam"]:
        s_ = statistics.median(rows["steam"])
        print(f"STEAM-ROME (anchor cached): median {s_:.2f} s per edit = {s_ / f:.2f}x ROME")
    print(f"this process's peak RSS: {mem0:.0f} MB after loading, {mem_fast:.0f} MB after the "
          f"first fast edit, {peak_mb():.0f} MB overall (all paths and anchors)")
    fast_mb, plain_mb = peak_of("fast"), peak_of("plain")
    print(f"peak RSS, load + one edit, a process each: fast {fast_mb:.0f} MiB, plain "
          f"{plain_mb:.0f} MiB; fast / plain {fast_mb / plain_mb:.3f}, fast / EasyEdit's "
          f"{EASYEDIT_GIB} GiB {fast_mb / (EASYEDIT_GIB * 1024):.3f} (goal: at most 0.6)")
    print("speed-up of the shipped (float32) fast path over the plain one:")
    print(f"{p / f:.2f}")


if __name__ == "__main__":
    main()
