"""MEMIT: many edits at once, spread over a range of blocks' MLPs (Meng et al., 2023).

>>> from steamviz import memit
>>> edit = memit.apply(lm, requests)                  # one undoable WeightEdit   # doctest: +SKIP
>>> edit = memit.apply(lm, requests, lam=50.0)        # STEAM-MEMIT              # doctest: +SKIP

1. Per request a target ``z_i`` for the residual stream leaving the last block of the range
   at the subject's last token: ROME's v* objective (:func:`steamviz.edit.rome.compute_v`, with
   STEAM's alignment term when ``lam > 0``; anchors are cached and shared between requests
   with the same new object). As in MEMIT's ``compute_z``, the norm clamp and the weight
   decay are relative to that residual stream on the bare rewrite prompt (``norm_ref``),
   not to the MLP output ROME uses.
2. For each block ``b`` of the range, in order: keys ``K`` (subject's last token; as in
   MEMIT's ``compute_ks``, the mean over each context-template type -- the bare ``"{}"``,
   then one type per ``(length, n)`` pair -- then the mean of those means), residuals
   ``R = (z - z_now) / (blocks left)``, and the least-squares update
   ``dW = R K^T (w C + K K^T)^-1`` with ``C`` the keys' second moment and
   ``w = mom2_update_weight``.

Context templates default to MEMIT's: the bare prompt and 5 model-written prefixes of 10
tokens (``context_template_length_params=((10, 5),)``; EasyEdit's MEMIT YAML has no such
field, so its files get this default too).

Choice where the paper's setting needs statistics we may not have: without a corpus,
``C`` is the identity scaled to the mean squared key norm per dimension of the keys seen
and ``mom2_update_weight`` defaults to ``d_in`` (MEMIT's 15000 was set for GPT-J's
``d_in`` = 16384 with real statistics; with the scaled identity, a weight far above
``d_in`` shrinks every update until the edits no longer land, as on SmolLM2's 1536-wide
keys: ``docs/results.md#memit``). Pass ``mom2_corpus`` for the real ``C`` (then the default
weight is 15000).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..core.memo import memo
from . import rome
from ..look.capture import capture
from ..core.context import context_templates
from .edits import WeightEdit
from ..core.guard import active_edits
from .hparams import VStarHparams
from ..data.requests import EditRequest
from ..core.tokens import fill


@dataclass
class MEMITHparams(VStarHparams):
    """MEMIT hyperparameters: the shared v* optimisation (its z at the last edited block;
    :class:`~steamviz.edit.hparams.VStarHparams`), the edited blocks and the statistics."""

    context_template_length_params: tuple = ((10, 5),)  # MEMIT's (ROME: ((5, 10), (10, 10)))
    RENAMED = {"layers": "blocks"}

    blocks: tuple = (3, 4, 5, 6, 7)
    mom2_update_weight: float | None = None  # None: 15000 with statistics, d_in without
    mom2_corpus: str | None = None
    mom2_n_tokens: int = 100_000
    # requests whose target vectors (z) are optimised together, each with its own delta, in
    # shared forward and backward passes (rome.compute_vs); the results equal one at a time
    # up to float rounding. 1: one at a time.
    z_batch: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blocks = tuple(int(x) for x in self.blocks)
        if not isinstance(self.z_batch, int) or isinstance(self.z_batch, bool) or self.z_batch < 1:
            raise ValueError(f"z_batch must be an integer >= 1, got {self.z_batch!r}")
        if not self.blocks or list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"blocks must be increasing and distinct, got {self.blocks}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "hparams", mom2_corpus: str | None = None
                  ) -> "MEMITHparams":
        """From an EasyEdit MEMIT hparams mapping (``layers: [13, ..., 17]``: block indices,
        steamviz's ``blocks``;
        ``mom2_update_weight``...; read from a YAML file by ``from_yaml(path,
        mom2_corpus=)``; an empty file is every default). Module-name templates are ignored
        (adapters find the modules). ``mom2_adjustment: true`` needs key statistics: pass
        ``mom2_corpus`` (a folder of .txt files, or ``"model"``); without one the scaled
        identity is used and a warning says so (EasyEdit's Wikipedia statistics are not
        available offline)."""
        import warnings

        d = {} if d is None else d  # an empty YAML file
        d = dict(d) if isinstance(d, dict) else d  # easyedit_kwargs names a non-mapping
        adjust = d.pop("mom2_adjustment", None) if isinstance(d, dict) else None
        kw = rome.easyedit_kwargs(cls, d, source, "MEMIT", {
            "layers": lambda v: {"blocks": tuple(int(x) for x in v)}})
        if mom2_corpus is not None:  # an explicit corpus wins
            kw["mom2_corpus"] = mom2_corpus
        elif adjust is False:
            kw["mom2_corpus"] = None
        if adjust and not kw.get("mom2_corpus"):
            warnings.warn(f"{source}: mom2_adjustment is on but no mom2_corpus was given; "
                          "using the scaled identity for C (pass mom2_corpus=<folder of .txt> "
                          "or 'model')", stacklevel=2)
        return cls(**kw)

    @classmethod
    def for_model(cls, lm) -> "MEMITHparams":
        b = rome.ROMEHparams.for_model(lm).block
        return cls(blocks=tuple(range(max(0, b - 2), min(lm.n_blocks, b + 3))))

    def rome_hparams(self) -> rome.ROMEHparams:
        """ROME's hyperparameters of MEMIT's z: the same v* optimisation, at the last edited
        block."""
        return rome.ROMEHparams(block=self.blocks[-1], **self.vstar())


def context_groups(length_params) -> list[int]:
    """How many templates of each type :func:`steamviz.core.context.context_templates` returns,
    in its order: the bare ``"{}"``, then ``n`` per ``(length, n)`` pair (pairs with
    ``n = 0`` give none)."""
    return [1] + [int(n) for _, n in length_params if int(n) > 0]


def _keys(lm, block: int, requests, contexts, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key per request ``[n, d_in]`` and every context key ``[n * c, d_in]``.

    ``groups``: sizes of the consecutive context-template types (:func:`context_groups`);
    the key is the mean of the per-type means, as MEMIT's ``compute_ks``. ``None``: one
    type, a flat mean over ``contexts``."""
    groups = [len(contexts)] if groups is None else [int(g) for g in groups]
    if sum(groups) != len(contexts) or min(groups) < 1:
        raise ValueError(f"context groups {groups} do not split {len(contexts)} contexts")
    prompts, subjects, starts = [], [], []
    for r in requests:
        inner, at = fill(r.prompt, r.subject)
        for c in contexts:  # the subject located from the slots (a context may contain it)
            text, j = fill(c, inner)
            prompts.append(text)
            subjects.append(r.subject)
            starts.append(j + at)
    k, _ = rome.keys_and_outputs(lm, block, prompts, subjects, starts)
    per = k.view(len(requests), len(contexts), -1)
    means = torch.stack([g.mean(1) for g in per.split(groups, dim=1)], dim=1)
    return means.mean(1), k


def _z_now(lm, requests, z_block: int) -> torch.Tensor:
    """Residual stream leaving block ``z_block`` (stream layer ``z_block + 1``) at the
    subject's last token, bare prompts."""
    filled = [fill(r.prompt, r.subject) for r in requests]  # the subject at the slot
    cap = capture(lm, [t for t, _ in filled], positions=("subject_last",), layers=[z_block + 1],
                  subjects=[r.subject for r in requests], subject_starts=[i for _, i in filled])
    return cap.tensor[:, 0, 0]


_Z_CACHE: dict = memo("memit.z")




def apply(lm, requests, hparams: MEMITHparams | None = None, lam: float = 0.0,
          align_layers=None, centered: bool = False, method: str | None = None,
          anchors: dict | None = None, bank=None) -> WeightEdit:
    """Edit all ``requests`` at once; returns one undoable :class:`WeightEdit`.

    With ``lam``: ``anchors`` (``{object: Anchor}``, default: built now) and ``bank`` (for
    ``centered``) must come from the unedited model (see :func:`steamviz.edit.steam.apply`)."""
    from ..core.arch import mlp_out_module

    requests = [EditRequest.from_dict(r) if isinstance(r, dict) else r for r in requests]
    if not requests:
        raise ValueError("MEMIT needs at least one request")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
        raise ValueError(f"lam must be a number >= 0 (0 is plain MEMIT), got {lam!r}")
    hp = hparams or MEMITHparams.for_model(lm)
    bad = [x for x in hp.blocks if not 0 <= x < lm.n_blocks]
    if bad:
        raise ValueError(f"blocks {bad} out of range: this model has blocks 0..{lm.n_blocks - 1}")
    t0 = time.perf_counter()
    rhp = hp.rome_hparams()
    z_block = hp.blocks[-1]
    align_for = {}
    if lam:
        from . import steam
        from ..look.anchors import build_anchor

        layers = align_layers or steam.default_layers(lm, z_block)
        for obj in {r.target_new for r in requests}:
            a = (anchors or {}).get(obj) or build_anchor(lm, obj)
            align_for[obj] = steam.make_align(lm, a, lam, layers, centered, bank=bank)
    z_init = _z_now(lm, requests, z_block)
    clean = not active_edits(lm.model)
    vs: list = [None] * len(requests)
    todo = []
    for i, r in enumerate(requests):
        # z_init[i] (the norm reference) is a function of the unedited model, the request
        # and rhp.block (= z_block), all in the key; the cache is read only on a clean model
        align = align_for.get(r.target_new)
        key = (lm.fingerprint, id(lm.model), repr(r.to_rome()), repr(rhp),
               None if align is None else align.key())
        vs[i] = _Z_CACHE.get(key) if clean else None
        if vs[i] is None:
            todo.append((i, key))
    for c in range(0, len(todo), hp.z_batch):  # MEMIT's compute_z, z_batch requests at once
        part = todo[c:c + hp.z_batch]
        # clamp and decay relative to the residual stream (target_init), as MEMIT's compute_z
        got = rome.compute_vs(lm, [rome.prepare(lm, requests[i], rhp) for i, _ in part], rhp,
                              [align_for.get(requests[i].target_new) for i, _ in part],
                              early_stop_on="rome", norm_ref=[z_init[i] for i, _ in part])
        for (i, key), v in zip(part, got):
            vs[i] = v
            if clean:
                _Z_CACHE[key] = v
        while len(_Z_CACHE) > 512:
            _Z_CACHE.pop(next(iter(_Z_CACHE)))
    deltas = [v.delta for v in vs]
    losses = [v.losses[-1] for v in vs]
    z = z_init + torch.stack(deltas)  # [n, d]
    contexts = context_templates(lm, hp.context_template_length_params, seed=hp.seed)
    groups = context_groups(hp.context_template_length_params)
    name = ("STEAM-MEMIT" if lam else "MEMIT") if method is None else method
    edit = WeightEdit(lm.model, name, dict(
        requests=[r.to_dict() for r in requests], hparams=hp.to_dict(), lam=lam,
        final_losses=losses))
    with edit.undo_on_error():
        for i, block in enumerate(hp.blocks):
            K, K_all = _keys(lm, block, requests, contexts, groups)  # [n, d_in]
            R = (z - _z_now(lm, requests, z_block)) / (len(hp.blocks) - i)  # [n, d]
            Kd, Rd = K.double().T, R.double().T  # [d_in, n], [d, n]
            if hp.mom2_corpus:
                from ..look.stats import second_moment

                C = second_moment(lm, block, corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens,
                                  seed=hp.seed).to(Kd.device)
            else:
                scale = K_all.double().pow(2).sum(-1).mean() / K_all.shape[-1]
                C = scale * torch.eye(Kd.shape[0], dtype=torch.float64, device=Kd.device)
            w = hp.mom2_update_weight
            if w is None:
                w = 15000.0 if hp.mom2_corpus else float(Kd.shape[0])
            adj = torch.linalg.solve(w * C + Kd @ Kd.T, Kd)  # [d_in, n]
            upd = (Rd @ adj.T).float()  # [d_out, d_in]
            W = mlp_out_module(lm.model, block).weight
            pname = lm.adapter.mlp_out.format(block) + ".weight"
            edit.add_delta(pname, (upd.T if lm.adapter.conv1d else upd).to(W.dtype))
    edit.info["seconds"] = time.perf_counter() - t0
    return edit


def _register() -> None:
    from .editors import check_fields, register

    def _hp(lm, hparams, block):
        if isinstance(hparams, MEMITHparams):
            return hparams
        base = MEMITHparams.for_model(lm)
        if isinstance(hparams, rome.ROMEHparams):  # a sweep's shared ROME settings
            block = hparams.block if block is None else block
            base = base.replace(
                v_num_grad_steps=hparams.v_num_grad_steps, v_lr=hparams.v_lr,
                early_stop_loss=hparams.early_stop_loss,
                context_template_length_params=hparams.context_template_length_params,
                seed=hparams.seed)
        if block is not None:  # the range ends at the given block
            base = base.replace(blocks=tuple(range(max(0, block - len(base.blocks) + 1),
                                                   block + 1)))
        return base

    fields = {f.name for f in dataclasses.fields(MEMITHparams)}

    def _split(lm, hparams, block, kw):  # MEMITHparams fields (e.g. a sweep's method_params)
        hp = _hp(lm, hparams, block)
        mine = {k: kw.pop(k) for k in list(kw) if k in fields}
        if mine:
            why = check_fields(MEMITHparams, mine, "MEMIT", lm.n_blocks)
            if why:
                raise ValueError(why)
            hp = hp.replace(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in mine.items()})
        return hp

    def _memit(lm, requests, hparams=None, block=None, **kw):
        return apply(lm, requests, hparams=_split(lm, hparams, block, kw), **kw)

    def _steam_memit(lm, requests, lam: float = 20.0, hparams=None, block=None, layers=None,
                     **kw):
        return apply(lm, requests, hparams=_split(lm, hparams, block, kw), lam=lam,
                     align_layers=layers, **kw)

    plain = ("block", "method")
    steam = plain + ("lam", "layers", "centered", "anchors", "bank")
    register("memit", batch=True, params=MEMITHparams, extra=plain,
             axes=("block", "batch"))(_memit)
    register("steam-memit", batch=True, params=MEMITHparams, extra=steam,
             axes=("block", "lam", "batch"), base="memit")(_steam_memit)
    register("memit", params=MEMITHparams, extra=plain)(
        lambda lm, request, **kw: _memit(lm, [request], **kw))
    register("steam-memit", params=MEMITHparams, extra=steam)(
        lambda lm, request, **kw: _steam_memit(lm, [request], **kw))


_register()
