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

from ..core.guard import active_edits


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
    """An edit that adds deltas to parameters, undone exactly in any order.

    Each edited parameter keeps, on its model, the value it had before its first edit and the
    ordered list of deltas the active edits added. Restoring an edit -- first, last or in
    between -- sets the parameter back to that value and adds the remaining edits' deltas
    again in their original order with the same operations, so the result is bit for bit the
    model with only the remaining edits applied, and the original once all are restored.
    """

    def __init__(self, model: nn.Module, method: str, info: dict | None = None):
        prov = provenance(model)  # the weights this edit is made on, before it changes them
        super().__init__(model, method, info)
        self.info.setdefault("provenance", prov)
        self.deltas: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()

    def add_delta(self, name: str, delta: torch.Tensor, index=None) -> None:
        """``param[name] += delta`` (or ``param[name][index] += delta``), undoably."""
        p = dict(self.model.named_parameters())[name]
        with torch.no_grad():
            d = delta.detach().to(p.dtype).to(p.device)
            self._push(name, p, ("add", d, index))
        if index is None:
            self.deltas[name] = self.deltas.get(name, 0) + delta.detach().cpu()

    def set_flat(self, name: str, flat_idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``param[name].reshape(-1)[flat_idx] = values``, undoably; returns the values the
        entries held before."""
        p = dict(self.model.named_parameters())[name]
        if not p.is_contiguous():
            raise ValueError(f"{name} is not contiguous; cannot edit entries in place")
        idx = flat_idx.to(p.device)
        with torch.no_grad():
            before = p.data.view(-1)[idx].clone()
            self._push(name, p, ("set_flat", values.to(device=p.device, dtype=p.dtype), idx))
        return before

    def _push(self, name: str, p: torch.Tensor, op: tuple) -> None:
        stack = _weight_stack(self.model)
        if name not in stack:
            stack[name] = dict(base=p.detach().clone(), ops=[])
        stack[name]["ops"].append((id(self), *op))
        _apply(p, *op)
        if name not in self._touched:
            self._touched.add(name)
            self.on_restore(lambda name=name: self._unwind(name))

    def _unwind(self, name: str) -> None:
        stack = _weight_stack(self.model)
        entry = stack[name]
        p = dict(self.model.named_parameters())[name]
        entry["ops"] = [x for x in entry["ops"] if x[0] != id(self)]
        with torch.no_grad():
            p.data.copy_(entry["base"])
            for _, *op in entry["ops"]:
                _apply(p, *op)
        if not entry["ops"]:
            del stack[name]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas (+ request/method metadata) to a safetensors file, atomically."""
        return WeightDelta(self.method, dict(self.deltas), json_info(self.info)).save(path)


def provenance(model: nn.Module) -> dict:
    """What a saved delta records of the model it was made on: a fingerprint of the weights
    as they were (:func:`steamviz.core.models.fingerprint_model`), the model type and dtype, and
    the steamviz version."""
    from .. import __version__
    from ..core.models import fingerprint_model

    p = next(model.parameters(), None)
    cfg = getattr(model, "config", None)
    return dict(weights=fingerprint_model(model), model_type=getattr(cfg, "model_type", None),
                dtype=str(p.dtype) if p is not None else None, steamviz=__version__)


def _weight_stack(model: nn.Module) -> dict:
    """``{param name: {"base": value before its first active edit, "ops": [(edit id,
    delta, index), ...]}}`` of the active weight edits of ``model``."""
    st = getattr(model, "_steamviz_weight_stack", None)
    if st is None:
        st = {}
        model._steamviz_weight_stack = st
    return st


def _apply(p: torch.Tensor, op: str, d: torch.Tensor, index) -> None:
    """One recorded change: ``add`` (``p += d``, or ``p[index] += d``) or ``set_flat``
    (``p.reshape(-1)[index] = d``)."""
    with torch.no_grad():
        if op == "add":
            if index is None:
                p.data.add_(d)
            else:
                p.data[index] += d
        else:
            p.data.view(-1)[index] = d


def json_info(info: dict) -> dict:
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

        from ..core.io import write_bytes

        meta = {"method": self.method, "info": json.dumps(self.info)}
        blob = save({k: v.contiguous() for k, v in self.deltas.items()}, metadata=meta)
        return write_bytes(path, blob)

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(self.method.encode())
        for k in sorted(self.deltas):
            h.update(k.encode())
            h.update(self.deltas[k].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def apply(self, model, force: bool = False) -> WeightEdit:
        """Apply to ``model`` (an ``nn.Module`` or a steamviz LM). Checked first, so nothing is
        half-applied: names and shapes; that the model's weights are the ones the delta was
        made on (its provenance fingerprint; ``force=True`` skips this check); and that this
        delta is not already in place on the model (refused even with ``force``)."""
        if not isinstance(model, nn.Module):  # a steamviz LM
            model = model.model
        params = dict(model.named_parameters())
        for k, v in self.deltas.items():
            if k not in params:
                raise KeyError(f"edit touches {k!r}, which this model does not have")
            if params[k].shape != v.shape:
                raise ValueError(f"{k}: delta shape {tuple(v.shape)} != {tuple(params[k].shape)}")
        digest = self.digest()
        if digest in getattr(model, "_steamviz_applied", {}):
            raise ValueError(f"this {self.method} delta is already applied to this model (an "
                             "active edit); restore that edit before applying it again")
        want = (self.info.get("provenance") or {}).get("weights")
        if not force:
            if want is None:
                raise ValueError("this delta records no provenance (saved by an older steamviz):"
                                 " pass force=True to apply it to this model anyway")
            from ..core.models import fingerprint_model

            have = fingerprint_model(model)
            if have != want:
                raise ValueError(
                    f"this delta was made on other weights (fingerprint {want}, this model "
                    f"{have}): another model, a fine-tune, or this model with other edits in "
                    "place; pass force=True to apply it anyway")
        edit = WeightEdit(model, self.method, self.info)
        with edit.undo_on_error():
            for k, v in self.deltas.items():
                edit.add_delta(k, v)
        applied = getattr(model, "_steamviz_applied", None)
        if applied is None:
            applied = {}
            model._steamviz_applied = applied
        applied[digest] = edit.method
        edit.on_restore(lambda: applied.pop(digest, None))
        return edit


def load_edit(path: str | os.PathLike) -> WeightDelta:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        deltas = {k: f.get_tensor(k) for k in f.keys()}
    return WeightDelta(meta.get("method", "unknown"), deltas, json.loads(meta.get("info", "{}")))
