"""One interface over every editor: ``edit(lm, request, method, **params) -> Edit``.

>>> e = edit(lm, request, "rome")                       # doctest: +SKIP
>>> e = edit(lm, request, "steam-rome", lam=20.0)       # doctest: +SKIP
>>> e.restore()

Each method takes the request plus keyword parameters and returns an undoable
:class:`~steamviz.edits.Edit`. ``register`` adds a method. Batch editors (MEMIT) also take
many requests at once through :func:`edit_batch`:

>>> e = edit_batch(lm, requests, "memit")                # one Edit for all   # doctest: +SKIP

Built in: ``rome``, ``steam-rome``, ``memit``, ``steam-memit``, ``sake``, ``baft``, ``kne``.
"""

from __future__ import annotations

import dataclasses

from typing import Callable

from .edits import Edit
from .requests import EditRequest

METHODS: dict[str, Callable[..., Edit]] = {}
BATCH_METHODS: dict[str, Callable[..., Edit]] = {}
BUILTIN_MODULES = ("memit", "steam", "sake", "baft", "kne")


def register(name: str, batch: bool = False):
    """Decorator: register ``fn(lm, request, **params) -> Edit`` under ``name``; with
    ``batch=True``, ``fn(lm, requests, **params) -> Edit`` for :func:`edit_batch`."""

    def deco(fn):
        (BATCH_METHODS if batch else METHODS)[name.lower()] = fn
        return fn

    return deco


def edit(lm, request: EditRequest | dict, method: str = "rome", **params) -> Edit:
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    key = method.lower()
    if key not in METHODS:
        _load_builtin()
    if key not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; choose from {sorted(METHODS)}")
    request.check_length(lm)
    return METHODS[key](lm, request, **params)


def edit_batch(lm, requests, method: str = "memit", **params) -> Edit:
    """Edit with many requests at once (batch editors only); one undoable Edit."""
    requests = [EditRequest.from_dict(r) if isinstance(r, dict) else r for r in requests]
    key = method.lower()
    if key not in BATCH_METHODS:
        _load_builtin()
    if key not in BATCH_METHODS:
        raise ValueError(f"{method!r} is not a batch editor; batch editors: "
                         f"{sorted(BATCH_METHODS)} (edit one request at a time with edit())")
    for r in requests:
        r.check_length(lm)
    return BATCH_METHODS[key](lm, requests, **params)


def _load_builtin() -> None:
    import importlib

    if "rome" not in METHODS:
        _register_builtin()
    for mod in BUILTIN_MODULES:  # they register themselves on import
        importlib.import_module(f"{__package__}.{mod}")


def _register_builtin() -> None:
    from . import rome

    @register("rome")
    def _rome(lm, request, layer: int | None = None, hparams=None, **hp):
        hparams = hparams or rome.ROMEHparams.for_model(lm)
        if layer is not None:
            hp["layer"] = layer
        if hp:
            unknown = sorted(set(hp) - {f.name for f in dataclasses.fields(hparams)})
            if unknown:
                raise ValueError(f"unknown ROME parameter(s) {unknown}; fields of ROMEHparams: "
                                 f"{[f.name for f in dataclasses.fields(hparams)]}")
            hparams = hparams.replace(**hp)
        return rome.apply(lm, request, hparams)
