"""Edits are objects you can undo.

Every editor returns an :class:`Edit`. ``restore()`` puts the model back bit for bit (the
original values of every touched parameter are kept), and an ``Edit`` is a context
manager that restores on exit, also when an exception is raised inside the block.

>>> with rome.apply(lm, request) as edit:          # doctest: +SKIP
...     print(greedy(lm, [request.rewrite_prompt]))
>>> # here the model is exactly the unedited model again

Weight edits save their deltas to safetensors, so an edit can be replayed on a fresh copy
of the same model (:func:`load_edit` then :meth:`WeightDelta.apply`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn


def active_edits(model: nn.Module) -> int:
    """How many edits are in place on ``model`` now (caches of the unedited model, such as
    ROME's preparation and MEMIT's target vectors, are filled only while this is 0)."""
    return getattr(model, "_steamviz_active_edits", 0)


class EditedModelError(RuntimeError):
    """Something that must come from the unedited model was asked of an edited one."""


def require_unedited(model: nn.Module, what: str) -> None:
    """Raise :class:`EditedModelError` when an edit is in place on ``model``.

    References (anchors, the reference bank, recall checks, reference texts) describe the
    model's own knowledge: read from an edited model they would measure the edit against
    itself.
    """
    n = active_edits(model)
    if n:
        raise EditedModelError(
            f"{what} must be read from the unedited model, but {n} edit(s) are in place. "
            "Build references before the first edit (steamviz.references.build_references, "
            "or build_anchor(...) and pass anchor=... to the editor), or restore the edits "
            "first.")


class Edit:
    """A change applied to a model, with what is needed to undo it exactly.

    An edit counts as active on its model from construction until :meth:`restore`
    (:func:`active_edits`), whatever it changes: weights, hooks, or both.
    """

    def __init__(self, model: nn.Module, method: str, info: dict | None = None):
        self.model = model
        self.method = method
        self.info: dict[str, Any] = dict(info or {})
        self._undo: list[Callable[[], None]] = [self._untrack]  # undone last
        self.active = True
        model._steamviz_active_edits = active_edits(model) + 1

    def _untrack(self) -> None:
        self.model._steamviz_active_edits = active_edits(self.model) - 1

    @contextlib.contextmanager
    def undo_on_error(self) -> Iterator["Edit"]:
        """Apply the edit's changes inside this block: any exception restores what was
        already applied before it propagates, so nothing is left half-applied."""
        try:
            yield self
        except BaseException:
            self.restore()
            raise

    # -- undo ---------------------------------------------------------------------
    def on_restore(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def restore(self) -> None:
        """Undo the edit exactly (idempotent)."""
        if not self.active:
            return
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # keep undoing the rest
                errors.append(e)
        self.active = False
        if errors:
            raise RuntimeError(f"restore of {self.method} edit failed: {errors}")

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"<{type(self).__name__} {self.method} ({state})>"


class WeightEdit(Edit):
    """An edit that adds deltas to parameters. Keeps originals for a bitwise restore."""

    def __init__(self, model: nn.Module, method: str, info: dict | None = None):
        super().__init__(model, method, info)
        self.deltas: dict[str, torch.Tensor] = {}

    def add_delta(self, name: str, delta: torch.Tensor, index=None) -> None:
        """``param[name] += delta`` (or ``param[name][index] += delta``), undoably."""
        p = dict(self.model.named_parameters())[name]
        with torch.no_grad():
            if index is None:
                orig = p.detach().clone()
                self.on_restore(lambda p=p, orig=orig: p.data.copy_(orig))
                p.add_(delta.to(p.dtype).to(p.device))
                self.deltas[name] = self.deltas.get(name, 0) + delta.detach().cpu()
            else:
                orig = p.data[index].clone()

                def undo(p=p, orig=orig, index=index):
                    p.data[index] = orig

                self.on_restore(undo)
                p.data[index] += delta.to(p.dtype).to(p.device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas (+ request/method metadata) to a safetensors file, atomically."""
        return WeightDelta(self.method, dict(self.deltas), _jsonable(self.info)).save(path)


def _jsonable(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            if hasattr(v, "to_dict"):
                out[k] = v.to_dict()
            elif hasattr(v, "__dataclass_fields__"):
                from dataclasses import asdict

                out[k] = asdict(v)
    return out


@dataclass
class WeightDelta:
    """Saved weight deltas: apply them to a fresh copy of the model to replay an edit."""

    method: str
    deltas: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        from .io import write_bytes

        meta = {"method": self.method, "info": json.dumps(self.info)}
        blob = save({k: v.contiguous() for k, v in self.deltas.items()}, metadata=meta)
        return write_bytes(path, blob)

    def apply(self, model: nn.Module) -> WeightEdit:
        """Apply to ``model`` (shapes are checked first: nothing is half-applied)."""
        params = dict(model.named_parameters())
        for k, v in self.deltas.items():
            if k not in params:
                raise KeyError(f"edit touches {k!r}, which this model does not have")
            if params[k].shape != v.shape:
                raise ValueError(f"{k}: delta shape {tuple(v.shape)} != {tuple(params[k].shape)}")
        edit = WeightEdit(model, self.method, self.info)
        with edit.undo_on_error():
            for k, v in self.deltas.items():
                edit.add_delta(k, v)
        return edit


def load_edit(path: str | os.PathLike) -> WeightDelta:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        deltas = {k: f.get_tensor(k) for k in f.keys()}
    return WeightDelta(meta.get("method", "unknown"), deltas, json.loads(meta.get("info", "{}")))
