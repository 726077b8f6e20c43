"""steamviz: study where knowledge edits live inside a language model.

Data flows one way: model -> capture -> edit -> capture -> metrics / geometry -> figures.

>>> import steamviz as sv
>>> lm = sv.load_model()                # SmolLM2-135M, offline               # doctest: +SKIP
>>> cap = sv.capture(lm, ["The capital of France is"])  # [prompt, layer, pos, hidden]  # doctest: +SKIP
>>> edit = sv.rome.apply(lm, request); edit.restore()                        # doctest: +SKIP

Importing steamviz is cheap: submodules (and torch-heavy or numba-heavy dependencies such
as umap) load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("steamviz.models", "load_model"),
    "from_model": ("steamviz.models", "from_model"),
    "LM": ("steamviz.models", "LM"),
    "capture": ("steamviz.capture", "capture"),
    "Capture": ("steamviz.capture", "Capture"),
    "EditRequest": ("steamviz.requests", "EditRequest"),
    "greedy": ("steamviz.forward", "greedy"),
    "target_logprobs": ("steamviz.forward", "target_logprobs"),
    "load_edit": ("steamviz.edits", "load_edit"),
    "clear_caches": ("steamviz.memo", "clear_caches"),
}
_SUBMODULES = {
    "arch", "capture", "context", "datasets", "edits", "forward", "metrics", "models",
    "paths", "requests", "rome", "stats", "tokens", "steam", "anchors", "integration",
    "geometry", "figures", "sweep", "widgets", "editors", "evaluation", "io", "memit", "cli",
    "executors", "sake", "baft", "kne", "hooks", "memo", "hparams", "plan", "store", "runner",
    "style", "maps", "records", "facts", "vstar",
}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"steamviz.{name}")
    raise AttributeError(f"module 'steamviz' has no attribute {name!r}")
