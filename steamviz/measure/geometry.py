"""Latent maps: project residual streams to 2-D (or 3-D) so isolated and integrated edits
can be seen.

A map is *fitted* once on the unedited model's streams of many reference facts plus the
anchors at one layer (optionally centred on the bank mean), then edited representations
(pre, ROME, STEAM-ROME, ...) are *placed* into it with ``transform``, so maps are comparable
across edits and lambda values.

>>> m = fit_map(bank.tensor[:, 12].numpy(), method="umap")     # doctest: +SKIP
>>> xy = m.transform(h_edited)                                  # doctest: +SKIP

``method="umap"`` (umap-learn, after a PCA pre-reduction; fixed seed) or ``"pca"`` (fast).
umap is imported on first use only (numba compiles its kernels; their on-disk cache lives
in the steamviz cache dir, so later processes start faster). Fitted maps are kept in memory
by a hash of the data and settings, for the life of the process; they are not written to
disk (a fitted UMAP object can only be stored with pickle, which can run code when loaded).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..core.memo import memo
from ..core.paths import cache_dir


@dataclass
class LatentMap:
    method: str
    n_components: int
    pca: object  # sklearn PCA (pre-reduction, or the map itself for method="pca")
    reducer: object | None  # umap.UMAP or None
    center: np.ndarray | None
    embedding: np.ndarray  # [n_fit, n_components]
    settings: dict = field(default_factory=dict)

    def transform(self, x) -> np.ndarray:
        """Place new points ``[n, d]`` into the fitted map."""
        x = np.asarray(getattr(x, "numpy", lambda: x)() if hasattr(x, "detach") else x,
                       dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if self.center is not None:
            x = x - self.center
        z = self.pca.transform(x)
        if self.reducer is None:
            return z[:, : self.n_components]
        return self.reducer.transform(z)


class ExactIndex:
    """Exact nearest neighbours of new points among the fitted ones (cosine or euclidean),
    with the ``query`` of pynndescent's ``NNDescent`` that umap-learn's ``transform`` calls.

    For maps of up to ``exact_max`` points (default 20,000) an exact search is one blocked
    matrix product, faster than building and compiling an approximate index, and exact.

    >>> idx = ExactIndex(np.eye(3, dtype=np.float32), "euclidean")
    >>> idx.query(np.eye(3, dtype=np.float32)[:1], k=2)[0].tolist()
    [[0, 1]]
    """

    _angular_trees = False  # read by umap's transform (search epsilon)

    def __init__(self, data: np.ndarray, metric: str = "cosine"):
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"exact neighbours support 'cosine' or 'euclidean', not {metric!r}")
        self.metric = metric
        self.data = self._prep(np.asarray(data, dtype=np.float32))
        self.sq = (self.data**2).sum(1)

    def _prep(self, x: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    def query(self, X, k: int = 15, epsilon: float = 0.0, block: int = 2048):
        """``(indices [n, k] int32, distances [n, k] float32)``, nearest first."""
        X = self._prep(np.asarray(X, dtype=np.float32))
        k = min(k, len(self.data))
        ind = np.empty((len(X), k), dtype=np.int32)
        dist = np.empty((len(X), k), dtype=np.float32)
        for s in range(0, len(X), block):
            g = X[s : s + block] @ self.data.T  # [b, n]
            if self.metric == "cosine":
                d = 1.0 - g
            else:
                d = (X[s : s + block] ** 2).sum(1)[:, None] + self.sq[None] - 2 * g
            np.maximum(d, 0.0, out=d)
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            dp = np.take_along_axis(d, part, 1)
            order = np.argsort(dp, axis=1, kind="stable")
            ind[s : s + block] = np.take_along_axis(part, order, 1)
            dd = np.take_along_axis(dp, order, 1)
            dist[s : s + block] = np.sqrt(dd) if self.metric == "euclidean" else dd
        return ind, dist


def _numba_cache() -> None:
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))


def import_umap():
    """Import umap-learn with numba's on-disk cache in the steamviz cache dir.

    umap-learn compiles most of its numba kernels without ``cache=True``, so every new
    process compiled them again (tens of seconds). Here the on-disk cache is switched on for
    each of umap's kernels before first use (``Dispatcher.enable_caching``), so a fresh
    process loads them instead. Where umap compiles one Python function twice (a serial and
    a parallel build), only the serial build (the one a seeded map runs) gets the cache:
    numba keys its cache by function, so two caching builds would share entries.
    """
    _numba_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap
        from umap import distances, layouts, spectral, umap_, utils

    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    for mod in (umap_, layouts, utils, spectral, distances):
        disp = [o for o in vars(mod).values() if isinstance(o, CPUDispatcher)]
        shared = {id(f) for f in (o.py_func for o in disp)
                  if sum(o.py_func is f for o in disp) > 1}
        for obj in disp:
            if isinstance(obj._cache, NullCache) and not (
                    id(obj.py_func) in shared and obj.targetoptions.get("parallel")):
                obj.enable_caching()
    return umap


def fit_map(
    x,
    method: str = "umap",
    n_components: int = 2,
    pca_dims: int = 50,
    center: bool = True,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    n_epochs: int | None = 200,
    use_cache: bool = True,
    exact_max: int = 20_000,
) -> LatentMap:
    """Fit a map on ``x`` ``[n, d]`` (numpy or torch).

    UMAP's neighbour graph is exact (:class:`ExactIndex`) for up to ``exact_max`` points and
    pynndescent's approximate one above that; ``transform`` uses the same search.
    """
    from sklearn.decomposition import PCA

    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim != 2 or len(x) < max(5, n_components + 2):
        raise ValueError(f"fit_map needs [n >= 5, d] points, got shape {x.shape}")
    settings = dict(method=method, n_components=n_components, pca_dims=pca_dims, center=center,
                    seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                    n_epochs=n_epochs, exact=len(x) <= exact_max)
    h = hashlib.sha256(x.tobytes())
    h.update(repr(sorted(settings.items())).encode())
    key = h.hexdigest()[:20]
    if use_cache and key in _MAPS:
        return _MAPS[key]
    mu = x.mean(0) if center else None
    xc = x - mu if center else x
    k = min(pca_dims if method == "umap" else n_components, min(xc.shape) - 1)
    pca = PCA(n_components=k, random_state=seed).fit(xc)
    z = pca.transform(xc)
    reducer = None
    if method == "umap":
        umap = import_umap()
        nn = min(n_neighbors, len(x) - 1)
        knn = (None, None, None)
        if len(z) <= exact_max and metric in ("cosine", "euclidean"):
            index = ExactIndex(z, metric)
            knn = (*index.query(z, nn), index)
        reducer = umap.UMAP(n_components=n_components, n_neighbors=nn, min_dist=min_dist,
                            metric=metric, random_state=seed, transform_seed=seed, n_jobs=1,
                            n_epochs=n_epochs, precomputed_knn=knn)
        with warnings.catch_warnings():  # "not an NNDescent object": ours answers query()
            warnings.filterwarnings("ignore", message="precomputed_knn")
            emb = reducer.fit_transform(z)
    else:
        emb = z[:, :n_components]
    m = LatentMap(method, n_components, pca, reducer, mu, np.asarray(emb), settings)
    if use_cache:
        _MAPS[key] = m
        while len(_MAPS) > 16:
            _MAPS.pop(next(iter(_MAPS)))
    return m


_MAPS: dict[str, LatentMap] = memo("geometry.maps")


