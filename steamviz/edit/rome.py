"""ROME: rank-one model editing (Meng et al., 2022), fast on a CPU.

The contract of the ROME repo, kept: a request in, the edited model plus what undoes it out.

>>> from steamviz import rome
>>> edit = rome.apply(lm, request)            # doctest: +SKIP
>>> edit.info["efficacy_after_opt"]            # doctest: +SKIP
>>> edit.restore()                # bitwise the original weights again  # doctest: +SKIP

How it works (``block`` = the edited block, its MLP output projection ``W``):

1. key ``k*``: input of ``W`` at the subject's last token, averaged over model-written
   context prefixes (:mod:`steamviz.core.context`); ``k`` also on the bare prompt.
2. value ``v*``: a delta added to ``W``'s output at the subject's last token, optimised
   with Adam for the target's NLL over the context prompts + ``kl_factor`` x
   KL(P_edited || P_init) on "{subject} is a" (ROME's order) + weight decay, norm-clamped,
   early-stopped.
   Speed: the blocks below ``block`` run once (their stream does not depend on the delta),
   the tokens before the subject's last one come from a key/value cache, block ``block``'s
   output is computed once, and each step runs the remaining tokens through blocks
   ``block+1..`` only -- via :mod:`steamviz.core.lean` on Llama, Qwen and Gemma 3 models --; logits are
   computed only where a loss reads them. STEAM adds its alignment term through
   ``compute_v(..., align=...)``.
3. rank-one update ``W += (v* - W k) u^T / (u . k)`` with ``u = C^-1 k*`` (``C`` the
   keys' second moment, identity by default as EasyEdit's shipped ROME configs).

SmolLM2's tokenizer adds no BOS: steamviz puts the model's start token before every prompt
(:mod:`steamviz.core.tokens`), so the bare rewrite prompt sees the same start as the contexts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..core.arch import as_out_in, mlp_out_module
from .edits import WeightEdit
from ..core.guard import active_edits
from ..core.memo import memo
from ..data.requests import EditRequest
from .rome_hparams import (  # noqa: F401 (re-exported)
    EASYEDIT_IGNORED,
    MODEL_DEFAULTS,
    ROMEHparams,
    easyedit_kwargs,
)
from .rome_prepare import Prepared, keys_and_outputs, prepare  # noqa: F401 (re-exported)
from .vstar import (  # noqa: F401 (re-exported)
    Align,
    VResult,
    compute_v,
    compute_v_reference,
    compute_vs,
)

_V_CACHE: dict[tuple, "VResult"] = memo("rome.v")  # v* per (model, request, hparams, objective)


def update_matrix(prep: Prepared, v: VResult) -> torch.Tensor:
    """``[d_out, d_in]`` rank-one update so that ``W' k_bare = v*`` (ROME's closed form)."""
    right = (v.target - prep.v_init) / torch.dot(prep.k_bare, prep.u)
    return torch.outer(right, prep.u)


def _v_key(lm, prep: Prepared, hp: ROMEHparams, align, early_stop_on: str):
    """The cache key of a target vector (None: not cacheable -- an objective without a
    ``key()``). v* depends only on the unedited model, the request, ``hp`` and the
    objective."""
    akey = None
    if align is not None:
        k = getattr(align, "key", None)
        if k is None:
            return None
        akey = k()
    return (lm.fingerprint, id(lm.model), repr(prep.request.to_rome()), repr(hp), early_stop_on,
            akey)


class Collected(Exception):
    """Raised by :func:`target_vector` inside :func:`collect`: the objective was recorded,
    nothing was computed or written."""


_COLLECT: list | None = None


@contextlib.contextmanager
def collect():
    """Record the target vectors that edits *would* optimise, without computing them, to
    optimise them together with :func:`compute_collected`. Inside the block, every ROME and
    STEAM-ROME edit stops with :class:`Collected` before it writes anything::

        with rome.collect() as wanted:
            for lam in (5.0, 20.0, 50.0):
                try:
                    steam.apply(lm, req, lam=lam, anchor=a)
                except rome.Collected:
                    pass
        rome.compute_collected(wanted)     # one optimisation; later edits reuse the results
    """
    global _COLLECT
    prev, _COLLECT = _COLLECT, []
    try:
        yield _COLLECT
    finally:
        _COLLECT = prev


def compute_collected(wanted: list) -> int:
    """Optimise the recorded target vectors, one :func:`compute_vs` per request and
    hyperparameters, into the cache that ROME and STEAM-ROME edits read. Returns how many
    were computed."""
    groups: dict = {}
    for lm, prep, hp, align, early, key in wanted:
        if key in _V_CACHE:
            continue
        g = groups.setdefault((id(prep), repr(hp), early), (lm, prep, hp, early, {}))
        g[4].setdefault(key, align)
    n = 0
    for lm, prep, hp, early, objs in groups.values():
        for key, v in zip(objs, compute_vs(lm, prep, hp, list(objs.values()), early)):
            _V_CACHE[key] = v
            n += 1
    while len(_V_CACHE) > _V_CACHE_MAX:
        _V_CACHE.pop(next(iter(_V_CACHE)))
    return n


_V_CACHE_MAX = 4096

#: bump when the optimisation of v* changes: saved target vectors of another version are
#: not read (:func:`load_saved`)
VSTAR_FORMAT = 1


def _file_key(key: tuple) -> tuple[str, str]:
    """``(file stem, description)`` of a cache key, without the process-local model id."""
    import hashlib

    desc = repr((VSTAR_FORMAT, key[0]) + tuple(key[2:]))
    return hashlib.sha256(desc.encode()).hexdigest()[:24], desc


def load_saved(wanted: list, folder) -> int:
    """Put the target vectors of ``wanted`` (see :func:`collect`) that :func:`save_computed`
    wrote into ``folder`` into the cache, so a resumed sweep, or another process of it, does
    not optimise them again; returns how many were read. A file of another key (or another
    :data:`VSTAR_FORMAT`) is not read."""
    from ..core.io import load_tensors

    n = 0
    for _lm, _prep, _hp, _align, _early, key in wanted:
        if key in _V_CACHE:
            continue
        stem, desc = _file_key(key)
        path = Path(folder) / f"{stem}.safetensors"
        if not path.exists():
            continue
        t, meta = load_tensors(path, expect={"delta": (None,), "target": (None,)})
        if meta.get("key") != desc:
            continue
        _V_CACHE[key] = VResult(t["delta"], t["target"], losses=meta["losses"],
                                steps=int(meta["steps"]), seconds=float(meta["seconds"]))
        n += 1
    return n


def save_computed(wanted: list, folder) -> int:
    """Write the cached target vectors of ``wanted`` into ``folder`` (safetensors, one file
    per objective, atomically), those not there yet; returns how many were written."""
    from ..core.io import save_tensors

    n = 0
    for _lm, _prep, _hp, _align, _early, key in wanted:
        v = _V_CACHE.get(key)
        stem, desc = _file_key(key)
        path = Path(folder) / f"{stem}.safetensors"
        if v is None or path.exists():
            continue
        save_tensors(path, {"delta": v.delta, "target": v.target},
                     dict(key=desc, losses=v.losses, steps=v.steps, seconds=v.seconds))
        n += 1
    return n


def target_vector(lm, prep: Prepared, hp: ROMEHparams, align=None, early_stop_on: str = "rome"
                  ) -> tuple[VResult, bool]:
    """v* for ``prep`` under ``hp`` and the objective ``align``, and whether it came from the
    cache. On the unedited model results are kept (by request, hparams and objective), so a
    sweep that measures one edit against several anchor seeds, or computed its objectives
    together (:func:`collect`), optimises each once."""
    clean = not active_edits(lm.model)
    key = _v_key(lm, prep, hp, align, early_stop_on) if clean else None
    if _COLLECT is not None:
        if key is not None:
            _COLLECT.append((lm, prep, hp, align, early_stop_on, key))
        raise Collected()
    v = _V_CACHE.get(key) if key is not None else None
    if v is not None:
        return v, True
    v = compute_v(lm, prep, hp, align=align, early_stop_on=early_stop_on)
    if key is not None:
        _V_CACHE[key] = v
        while len(_V_CACHE) > _V_CACHE_MAX:
            _V_CACHE.pop(next(iter(_V_CACHE)))
    return v, False


def apply(
    lm,
    request: EditRequest | dict,
    hparams: ROMEHparams | None = None,
    align: Align | None = None,
    method: str = "ROME",
    early_stop_on: str = "rome",
) -> WeightEdit:
    """Edit ``lm`` in place; returns a :class:`~steamviz.edit.edits.WeightEdit` handle.

    If anything fails before the update is written, the model is untouched; the update
    itself is applied through the handle, which restores bit for bit.
    """
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = hparams or ROMEHparams.for_model(lm)
    prep = prepare(lm, request, hp)
    v, reused = target_vector(lm, prep, hp, align, early_stop_on)
    return write_update(lm, prep, v, method=method,
                        extra={"align": _align_info(align), "v_reused": reused})


def _align_info(align) -> dict | None:
    if align is None:
        return None
    return {"lam": align.lam, "layers": list(align.layers)}


def write_update(lm, prep: Prepared, v: VResult, method: str = "ROME", extra=None) -> WeightEdit:
    upd = update_matrix(prep, v)
    W = mlp_out_module(lm.model, prep.hp.block).weight
    name = lm.adapter.mlp_out.format(prep.hp.block) + ".weight"
    delta = upd.T if lm.adapter.conv1d else upd
    info = dict(
        request=prep.request.to_dict(), hparams=prep.hp.to_dict(), block=prep.hp.block,
        steps=v.steps, losses=v.losses, seconds_prepare=prep.seconds, seconds_opt=v.seconds,
        **(extra or {}),
    )
    if as_out_in(W, lm.adapter).shape != upd.shape:
        raise ValueError(f"update shape {tuple(upd.shape)} does not fit {name} {tuple(W.shape)}")
    edit = WeightEdit(lm.model, method, info)
    with edit.undo_on_error():
        edit.add_delta(name, delta.to(W.dtype))
    return edit
