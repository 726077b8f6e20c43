"""Time to fit and transform a UMAP map of 5,000 576-dimensional points, cold and warm.

cold: a fresh Python process with an empty numba cache (imports umap, compiles, fits);
warm: a fresh process after that (numba's on-disk cache filled; the fitted-map cache is
bypassed so the fit itself is timed). Same data in both (seeded clusters).
Run: python benchmarks/bench_projection.py. Target here: warm <= 10 s, cold <= 30 s.
Last line: warm seconds.
"""

import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import time, numpy as np
t0 = time.perf_counter()
from steamviz.geometry import fit_map
rng = np.random.default_rng(0)
centers = rng.normal(size=(25, 576)) * 3
x = (centers[rng.integers(0, 25, 5000)] + rng.normal(size=(5000, 576))).astype(np.float32)
m = fit_map(x, method="umap", use_cache=False)
y = m.transform(x[:500])
print(f"{time.perf_counter() - t0:.2f} {y.shape}")
"""


def run(env) -> float:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - t
    print("  child:", out.stdout.strip(), f"(wall incl. interpreter start {wall:.2f} s)")
    return wall


def main():
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, STEAMVIZ_CACHE=d, NUMBA_CACHE_DIR=os.path.join(d, "numba"))
        print("cold (empty numba cache):")
        cold = run(env)
        print("warm (numba cache filled):")
        warm = run(env)
    print(f"cold {cold:.1f} s (target <= 30), warm {warm:.1f} s (target <= 10)")
    print("warm seconds:")
    print(f"{warm:.2f}")


if __name__ == "__main__":
    main()
