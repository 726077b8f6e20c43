"""Time to fit and transform a UMAP map of 5,000 576-dimensional points.

Each measurement fits ``fit_map(x, method="umap")`` (PCA to 50 dims, exact cosine
neighbour graph, 200 epochs; the fitted-map cache bypassed) and places 500 points with
``transform``. Same seeded data (25 clusters) everywhere.
- first: a fresh process with an empty numba cache (imports umap and compiles every
  kernel; happens once per machine / cache dir). Reported for information.
- cold: a fresh process after that (umap's kernels come from numba's on-disk cache):
  import + fit + transform. Target <= 30 s.
- warm: a second fit + transform in the same process as ``cold``, on other points of the
  same size (what a notebook's next map costs). Target <= 10 s.
Run: python benchmarks/bench_projection.py. Last line: warm seconds.
"""

import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import time, numpy as np
t0 = time.perf_counter()
from steamviz.measure.geometry import fit_map
rng = np.random.default_rng(0)
centers = rng.normal(size=(25, 576)) * 3
def data(seed):
    r = np.random.default_rng(seed)
    return (centers[r.integers(0, 25, 5000)] + r.normal(size=(5000, 576))).astype(np.float32)
x = data(1)
m = fit_map(x, method="umap", use_cache=False)
y = m.transform(x[:500])
cold = time.perf_counter() - t0
t = time.perf_counter()
x2 = data(2)
m2 = fit_map(x2, method="umap", use_cache=False)
y2 = m2.transform(x2[:500])
warm = time.perf_counter() - t
print(f"{cold:.3f} {warm:.3f}")
"""


def run(env) -> tuple[float, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - t
    cold, warm = map(float, out.stdout.split())
    # the cold figure includes interpreter start: wall time of the child up to its first map
    return wall - warm, warm


def main():
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, STEAMVIZ_CACHE=d, NUMBA_CACHE_DIR=os.path.join(d, "numba"))
        first, _ = run(env)
        print(f"first (empty numba cache, fresh process): {first:.1f} s")
        cold, warm = run(env)
        print(f"cold (fresh process, kernels from numba's cache): {cold:.1f} s (target <= 30)")
        print(f"warm (second map in the same process): {warm:.1f} s (target <= 10)")
    print("warm seconds:")
    print(f"{warm:.2f}")


if __name__ == "__main__":
    main()
