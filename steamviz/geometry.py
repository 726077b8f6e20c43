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
in the steamviz cache dir, so later processes start faster). Fitted maps are cached on disk
by a hash of the data and settings.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass, field

import numpy as np

from .models import cache_dir


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


def _numba_cache() -> None:
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))


def import_umap():
    """Import umap-learn with numba's on-disk cache in the steamviz cache dir."""
    _numba_cache()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap

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
) -> LatentMap:
    """Fit a map on ``x`` ``[n, d]`` (numpy or torch)."""
    from sklearn.decomposition import PCA

    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim != 2 or len(x) < max(5, n_components + 2):
        raise ValueError(f"fit_map needs [n >= 5, d] points, got shape {x.shape}")
    settings = dict(method=method, n_components=n_components, pca_dims=pca_dims, center=center,
                    seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                    n_epochs=n_epochs)
    h = hashlib.sha256(x.tobytes())
    h.update(repr(sorted(settings.items())).encode())
    path = cache_dir() / "maps" / f"{h.hexdigest()[:20]}.pkl"
    if use_cache and path.exists():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except Exception:
            path.unlink(missing_ok=True)
    mu = x.mean(0) if center else None
    xc = x - mu if center else x
    k = min(pca_dims if method == "umap" else n_components, min(xc.shape) - 1)
    pca = PCA(n_components=k, random_state=seed).fit(xc)
    z = pca.transform(xc)
    reducer = None
    if method == "umap":
        umap = import_umap()
        reducer = umap.UMAP(n_components=n_components, n_neighbors=min(n_neighbors, len(x) - 1),
                            min_dist=min_dist, metric=metric, random_state=seed,
                            transform_seed=seed, n_jobs=1, n_epochs=n_epochs)
        emb = reducer.fit_transform(z)
    else:
        emb = z[:, :n_components]
    m = LatentMap(method, n_components, pca, reducer, mu, np.asarray(emb), settings)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(m, f)
        os.replace(tmp, path)
    return m
