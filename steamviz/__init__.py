"""steamviz: study where knowledge edits live inside a language model.

Data flows one way: model -> capture -> edit -> capture -> metrics / geometry -> figures.
The subpackages show it; each imports only those above it (``tests/test_packaging.py``):

    core      the model and how steamviz reads it (loading, tokens, forward passes, hooks)
    data      edit requests and reference facts, the data-set loaders, public data
    look      reading the unedited model: capture, anchors, recall checks, the fact pool
    edit      editors behind one registry: ROME, STEAM, MEMIT, SAKE, BaFT, KNE
    measure   metrics, integration against anchors, latent maps, references, statistics
    run       sweeps (plan, store, runner, executors), evaluation tables, the claims report
    show      figure style, figures, widgets, replayed edits, the demo

Every module is also reachable by its own name: ``sv.rome`` is ``steamviz.edit.rome``.

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
    "load_model": ("steamviz.core.models", "load_model"),
    "from_model": ("steamviz.core.models", "from_model"),
    "LM": ("steamviz.core.models", "LM"),
    "capture": ("steamviz.look.capture", "capture"),
    "Capture": ("steamviz.look.capture", "Capture"),
    "EditRequest": ("steamviz.data.requests", "EditRequest"),
    "greedy": ("steamviz.core.forward", "greedy"),
    "target_logprobs": ("steamviz.core.forward", "target_logprobs"),
    "load_edit": ("steamviz.edit.edits", "load_edit"),
    "clear_caches": ("steamviz.core.memo", "clear_caches"),
}
#: every module, reachable as ``steamviz.<module>`` (``sv.rome``) without naming its subpackage
_SUBMODULES = {
    "anchors": "steamviz.look.anchors",
    "arch": "steamviz.core.arch",
    "baft": "steamviz.edit.baft",
    "capture": "steamviz.look.capture",
    "claims": "steamviz.run.claims",
    "compare": "steamviz.measure.compare",
    "context": "steamviz.core.context",
    "datasets": "steamviz.data.datasets",
    "demo": "steamviz.show.demo",
    "editors": "steamviz.edit.editors",
    "edits": "steamviz.edit.edits",
    "evaluation": "steamviz.run.evaluation",
    "executors": "steamviz.run.executors",
    "facts": "steamviz.data.facts",
    "fetch": "steamviz.data.fetch",
    "figures": "steamviz.show.figures",
    "forward": "steamviz.core.forward",
    "geometry": "steamviz.measure.geometry",
    "guard": "steamviz.core.guard",
    "hooks": "steamviz.core.hooks",
    "hparams": "steamviz.edit.hparams",
    "integration": "steamviz.measure.integration",
    "io": "steamviz.core.io",
    "kne": "steamviz.edit.kne",
    "kne_attribution": "steamviz.edit.kne_attribution",
    "lean": "steamviz.core.lean",
    "maps": "steamviz.show.maps",
    "memit": "steamviz.edit.memit",
    "memo": "steamviz.core.memo",
    "metrics": "steamviz.measure.metrics",
    "models": "steamviz.core.models",
    "paths": "steamviz.core.paths",
    "plan": "steamviz.run.plan",
    "pool": "steamviz.look.pool",
    "records": "steamviz.data.records",
    "references": "steamviz.measure.references",
    "replay": "steamviz.show.replay",
    "requests": "steamviz.data.requests",
    "rome": "steamviz.edit.rome",
    "rome_hparams": "steamviz.edit.rome_hparams",
    "rome_prepare": "steamviz.edit.rome_prepare",
    "runner": "steamviz.run.runner",
    "sake": "steamviz.edit.sake",
    "sake_fit": "steamviz.edit.sake_fit",
    "sake_hparams": "steamviz.edit.sake_hparams",
    "sake_prompts": "steamviz.edit.sake_prompts",
    "stats": "steamviz.look.stats",
    "steam": "steamviz.edit.steam",
    "store": "steamviz.run.store",
    "style": "steamviz.show.style",
    "sweep": "steamviz.run.sweep",
    "tokens": "steamviz.core.tokens",
    "vstar": "steamviz.edit.vstar",
    "widgets": "steamviz.show.widgets",
    "cli": "steamviz.cli",
    "doctor": "steamviz.doctor",
}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'steamviz' has no attribute {name!r}")
