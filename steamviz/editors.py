"""One interface over every editor: ``edit(lm, request, method, **params) -> Edit``.

>>> e = edit(lm, request, "rome")                       # doctest: +SKIP
>>> e = edit(lm, request, "steam-rome", lam=20.0)       # doctest: +SKIP
>>> e.restore()

Each method takes the request plus keyword parameters and returns an undoable
:class:`~steamviz.edits.Edit`. ``register`` adds a method.
"""

from __future__ import annotations

from typing import Callable

from .edits import Edit
from .requests import EditRequest

METHODS: dict[str, Callable[..., Edit]] = {}


def register(name: str):
    def deco(fn):
        METHODS[name.lower()] = fn
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
    return METHODS[key](lm, request, **params)


def _load_builtin() -> None:
    _register_builtin()
    from . import memit, steam  # noqa: F401  (they register themselves)


def _register_builtin() -> None:
    from . import rome

    @register("rome")
    def _rome(lm, request, layer: int | None = None, hparams=None, **hp):
        hparams = hparams or rome.ROMEHparams.for_model(lm)
        if layer is not None:
            hp["layer"] = layer
        if hp:
            hparams = hparams.replace(**hp)
        return rome.apply(lm, request, hparams)
