"""Every in-process cache of steamviz, in one place.

A module that keeps results for reuse within a process (v* per request, anchors, the fitted
IDF, UMAP fits, ...) asks :func:`memo` for a named dict instead of keeping a private global;
:func:`clear_caches` empties them all, or those under a name. Files cached on disk (under
:func:`steamviz.core.paths.cache_dir`) stay.

>>> import steamviz as sv
>>> sv.clear_caches()            # everything kept in memory, e.g. before timing a run
>>> sv.clear_caches("anchors")   # only anchors.recall, anchors.anchors, anchors.banks
>>> from steamviz.core.memo import sizes
>>> sizes()                      # entries held by the caches made so far # doctest: +SKIP
{'anchors.anchors': 3, 'anchors.banks': 1, ...}
"""

from __future__ import annotations

# Every cache, with what it holds. A new cache is one line here.
KNOWN = {
    "anchors.recall": "which reference facts the unedited model recalls, per model",
    "anchors.anchors": "semantic anchors per (model, object, sampling settings)",
    "anchors.banks": "kNN reference banks",
    "arch.cache_names": "the KV-cache keyword of each model class",
    "context.templates": "ROME's generated context prefixes per model",
    "geometry.maps": "fitted latent maps (UMAP/PCA)",
    "memit.z": "MEMIT target vectors per (model, request, hyperparameters)",
    "metrics.idf": "the IDF fitted on WikiText, per corpus",
    "metrics.reftext": "the unedited model's reference-text continuations (consistency)",
    "rome.prepared": "ROME's prepared rows (prefix caches, keys) per request",
    "rome.v": "ROME / STEAM target vectors per (model, request, hyperparameters, objective)",
    "rome.cinv": "inverse key second moments per (model, block)",
}
_ALL: dict[str, dict] = {}


def memo(name: str) -> dict:
    """The process-wide cache called ``name`` (one of :data:`KNOWN`)."""
    if name not in KNOWN:
        raise ValueError(f"no cache called {name!r}: add it to steamviz.core.memo.KNOWN")
    return _ALL.setdefault(name, {})


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return not prefixes or any(name == p or name.startswith(p + ".") for p in prefixes)


def clear_caches(*names: str) -> None:
    """Empty every in-process cache, or only those named (a name or its module prefix:
    ``"rome"`` clears ``rome.v``, ``rome.prepared``, ...). An unknown name is an error."""
    unknown = [p for p in names if not any(_matches(n, (p,)) for n in KNOWN)]
    if unknown:
        raise ValueError(f"no cache called {unknown}; the caches are {sorted(KNOWN)}")
    for name, cache in _ALL.items():
        if _matches(name, names):
            cache.clear()


def sizes() -> dict[str, int]:
    """``{cache name: entries held}``."""
    return {name: len(cache) for name, cache in sorted(_ALL.items())}
