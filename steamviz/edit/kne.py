"""KNE: Knowledge Neuronal Ensemble editing (Li et al., 2024), sparse and exactly undoable.

>>> from steamviz import kne
>>> edit = kne.apply(lm, request)                      # one undoable KNEEdit  # doctest: +SKIP
>>> edit.info["ensemble_size"], edit.info["ensemble_fraction"]               # doctest: +SKIP
>>> edit = editors.edit(lm, request, "kne", fraction=0.005, block_span=1.0)   # doctest: +SKIP
>>> edit.restore()                      # bitwise the original weights   # doctest: +SKIP

How it works (the feed-forward weight matrices ``W`` of the attributed blocks):

1. **Attribution** by integrated gradients over the weights: all attributed matrices are
   scaled jointly by ``alpha`` (``ig_steps`` Riemann midpoints of ``[0, 1]``) and the
   gradient of ``log P(target_new | rewrite prompt)`` is averaged;
   ``attr = |W * mean_alpha grad|`` per entry (the absolute value: an entry that strongly
   *suppresses* the target matters for the edit as much as one that promotes it;
   ``signed=True`` keeps only promoting entries). All alphas run as one batch through
   forward hooks (no weight copies; :func:`attribute_reference` is the plain version).
2. **Ensemble**: one global threshold over every attributed entry of every block keeps the
   top ``fraction`` (1 % by default) — :func:`select_top` (``torch.kthvalue`` after a
   sampled pre-filter, exact tie-breaking: ``torch.quantile`` refuses > 16M elements and
   SmolLM2 has 30 x 3 x 576 x 1536 = 80M FFN entries).
3. **Update**: only the ensemble's entries are free parameters (one flat tensor per matrix,
   scattered into a copy of the matrix inside :func:`torch.func.functional_call`, so the
   model itself is never touched while optimising). Adam on the target's mean per-token NLL
   over the rewrite prompt behind ROME's model-written context prefixes
   (:mod:`steamviz.core.context`) + ``kl_factor`` x KL on "{subject} is a" against the unedited
   model + an optional L2 penalty on the change; early stop when the NLL falls below
   ``early_stop_loss``.
4. The optimised entries are written through a :class:`KNEEdit`, which keeps the original
   values of exactly those entries: ``restore()`` is bitwise. Nothing is written before the
   optimisation has finished, and a failure while writing restores what was written.

Choices where the paper leaves room (all in :class:`KNEHparams`), chosen on SmolLM2-135M
with the default edit set (efficacy holds in every setting; the settings trade neighborhood
against paraphrase; the scores and commands: ``docs/results.md#kne``):

- ``matrices="all"``: every 2-D weight of the MLP block (Llama/Qwen/Gemma: gate, up, down;
  GPT-2: ``c_fc``, ``c_proj``; GPT-J: ``fc_in``, ``fc_out``; NeoX: ``dense_h_to_4h``,
  ``dense_4h_to_h``); ``"out"`` = only the output projection (ROME's matrix), ``"in"`` =
  the others. Entries are attributed in the matrices' storage layout, so GPT-2's transposed
  ``Conv1D`` needs no special case.
- ``attr_positions="subject"``: the attribution counts only the gradient through the
  subject's tokens (weight gradient summed over those positions), so the ensemble holds
  entries that act *on the subject*; ``"all"`` (the plain full gradient) picks entries
  that move the relation's answer for every subject (the neighborhood prompts flip too).
- ``block_span=1/3``: the first third of the blocks (0-9 of 30), where MLPs build the
  subject's representation (ROME's causal traces); all 30 blocks (the paper's setting,
  ``block_span=1.0``) let the optimiser find generic late-block shortcuts (neighborhood
  improves with early blocks, and more with subject attribution on top).
- ``early_stop_loss=0.2`` (mean P(target) ~ 0.8 over the contexts): enough for efficacy,
  less collateral than 0.05 and half the steps, at a small cost in paraphrase.
- The subject's tokens are located from the template's ``{}`` slot
  (:func:`steamviz.core.tokens.fill`), not by searching the subject's text, so a template whose
  text before the slot names the subject attributes through the slot's tokens.
- The attribution prompt is the bare rewrite prompt (the model's start tokens first) with
  the *new* target (``attr_target="new"``); ``"true"`` attributes the old answer instead
  (the knowledge-neuron reading), which needs ``request.target_true``.
- ``info["per_block"]``: ensemble entries per block, their fraction of the block's FFN
  entries, and ``neurons``: distinct intermediate units (rows of the input projections,
  columns of the output projection in ``[out, in]`` terms) with at least one selected entry.

Shapes: ``flat_idx[name]`` ``[k_name]`` indices into ``W.reshape(-1)`` of the stored weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.arch import get_module, lm_head_logits
from ..core.context import context_templates
from .edits import Edit, WeightDelta, WeightEdit
from .hparams import Hparams
from ..data.requests import EditRequest
from ..core.tokens import encode, fill, subject_span
from .kne_attribution import (  # noqa: F401 (re-exported)
    Targets,
    attribute,
    attribute_reference,
    run_with,
    select_top,
)



@dataclass
class KNEHparams(Hparams):
    """KNE hyperparameters.

    ``blocks``: the blocks whose FFN weights are attributed; ``None`` = the first
    ``block_span`` of the blocks (``max(1, round(n_blocks * block_span))`` of them).
    ``block_span=1.0`` (or ``blocks=range(n)``) attributes every block, as the paper.
    """

    RENAMED = {"layers": "blocks", "layer_span": "block_span"}

    fraction: float = 0.01  # of all attributed FFN entries, one global threshold
    matrices: str = "all"  # "all" | "out" | "in"
    blocks: tuple | None = None
    block_span: float = 1 / 3
    ig_steps: int = 16  # integrated-gradient Riemann midpoints
    attr_target: str = "new"  # "new" | "true"
    attr_positions: str = "subject"  # "subject" | "all": gradient through these tokens only
    signed: bool = False  # False: |attribution|; True: keep entries that promote the target
    steps: int = 30
    lr: float = 2e-3
    early_stop_loss: float = 0.2  # on the mean per-token NLL over the rewrite rows
    kl_factor: float = 0.0625
    kl_prompts: tuple = ("{} is a",)
    l2: float = 0.0  # x sum of squared changes of the ensemble entries
    context_template_length_params: tuple = ((5, 5), (10, 5))
    seed: int = 0

    def __post_init__(self) -> None:
        self.context_template_length_params = tuple(
            tuple(int(v) for v in x) for x in self.context_template_length_params)
        self.kl_prompts = tuple(self.kl_prompts)
        if self.blocks is not None:
            self.blocks = tuple(int(x) for x in self.blocks)
            if not self.blocks:
                raise ValueError("blocks must be None or a non-empty list of block indices")
        if not 0 < self.block_span <= 1:
            raise ValueError(f"block_span must be in (0, 1], got {self.block_span}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.matrices not in ("all", "out", "in"):
            raise ValueError(f"matrices must be 'all', 'out' or 'in', got {self.matrices!r}")
        if self.attr_positions not in ("all", "subject"):
            raise ValueError(f"attr_positions must be 'all' or 'subject', got {self.attr_positions!r}")
        if self.attr_target not in ("new", "true"):
            raise ValueError(f"attr_target must be 'new' or 'true', got {self.attr_target!r}")
        if self.ig_steps < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError("ig_steps and steps must be >= 1 and lr > 0")

    def resolve_blocks(self, n_blocks: int) -> tuple:
        if self.blocks is not None:
            return self.blocks
        return tuple(range(max(1, round(n_blocks * self.block_span))))

    @classmethod
    def for_model(cls, lm_or_name) -> "KNEHparams":
        return cls(**MODEL_DEFAULTS.get(cls.model_name(lm_or_name), {}))


MODEL_DEFAULTS: dict[str, dict] = {}


class KNEEdit(WeightEdit):
    """A sparse weight edit: original values of the touched entries only, restored bitwise.

    ``sparse[name] = (flat_idx, delta)`` (CPU, ``[k]`` each). ``deltas`` (dense, what
    :meth:`save` writes and :meth:`WeightDelta.apply` replays) is built on access.
    """

    def __init__(self, model, method: str = "KNE", info: dict | None = None):
        from .edits import provenance

        prov = provenance(model)
        Edit.__init__(self, model, method, info)
        self.info.setdefault("provenance", prov)
        self.sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._touched: set[str] = set()

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out = {}
        for name, (idx, d) in self.sparse.items():
            p = params[name]
            dense = torch.zeros(p.numel(), dtype=d.dtype)
            dense[idx] = d
            out[name] = dense.view(p.shape)
        return out

    def set_entries(self, name: str, flat_idx: torch.Tensor, values: torch.Tensor) -> None:
        """``param[name].reshape(-1)[flat_idx] = values``, undoably, in any order with other
        weight edits (:class:`~steamviz.edit.edits.WeightEdit`)."""
        before = self.set_flat(name, flat_idx, values)
        p = dict(self.model.named_parameters())[name]
        new = values.to(device=p.device, dtype=p.dtype)
        self.sparse[name] = (flat_idx.cpu(), (new.float() - before.float()).cpu())

    def save(self, path):
        from .edits import json_info

        return WeightDelta(self.method, self.deltas, json_info(self.info)).save(path)


# -- which matrices ---------------------------------------------------------------------------
def ffn_weights(lm, matrices: str = "all", blocks: Sequence[int] | None = None
                ) -> dict[str, torch.nn.Parameter]:
    """``{full parameter name: weight}`` of the MLP matrices KNE attributes, block by block."""
    ad = lm.adapter
    blocks = range(lm.n_blocks) if blocks is None else blocks
    bad = [x for x in blocks if not 0 <= x < lm.n_blocks]
    if bad:
        raise ValueError(f"blocks {bad} out of range: this model has blocks 0..{lm.n_blocks - 1}")
    out = {}
    for i in blocks:
        mlp_path = ad.mlp.format(i)
        out_path = ad.mlp_out.format(i)
        mlp = get_module(lm.model, mlp_path)
        for sub, p in mlp.named_parameters():
            if p.dim() != 2 or not sub.endswith("weight"):
                continue
            is_out = f"{mlp_path}.{sub}" == f"{out_path}.weight"
            if matrices == "all" or (matrices == "out") == is_out:
                out[f"{mlp_path}.{sub}"] = p
    if not out:
        raise ValueError(f"no MLP weight matrices found for matrices={matrices!r}")
    return out


def _block_of(lm, name: str) -> int:
    prefix = lm.adapter.blocks + "."
    return int(name[len(prefix):].split(".")[0])


def _units(d_model: int, shape, idx: torch.Tensor) -> torch.Tensor | None:
    """Intermediate units (the axis that is not ``d_model``) of flat indices ``idx`` into a
    ``shape`` matrix; ``None`` if the layout is ambiguous (square, or no ``d_model`` axis)."""
    if shape[0] == shape[1] or d_model not in shape:
        return None
    return idx // shape[1] if shape[1] == d_model else idx % shape[1]


# -- 3. the update ----------------------------------------------------------------------------
def _full(w: torch.Tensor, idx: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1).index_put((idx,), theta.to(w.dtype)).view(w.shape)


def optimise(lm, request: EditRequest, weights: dict[str, torch.Tensor],
             flat_idx: dict[str, torch.Tensor], hp: KNEHparams
             ) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    """New values of the ensemble entries ``{name: [k]}`` (float32), the loss records and
    the number of optimiser steps taken. The model is not modified."""
    contexts = context_templates(lm, hp.context_template_length_params, seed=hp.seed)
    tg = Targets(lm, [c.format(request.rewrite_prompt) for c in contexts], request.target_new)
    names = list(flat_idx)
    w0 = {n: weights[n].detach() for n in names}
    idx = {n: flat_idx[n].to(w0[n].device) for n in names}
    theta0 = {n: w0[n].reshape(-1)[idx[n]].float() for n in names}
    theta = {n: theta0[n].clone().requires_grad_(True) for n in names}
    opt = torch.optim.Adam(list(theta.values()), lr=hp.lr)
    # KL rows: "{subject} is a" against the unedited model's next-token distribution
    kl_batch = None
    if hp.kl_factor and hp.kl_prompts:
        kl_batch = encode(lm, [p.format(request.subject) for p in hp.kl_prompts])
        kl_rows = torch.arange(len(hp.kl_prompts), device=lm.device)
        kl_last = kl_batch.last.to(lm.device)
        with torch.no_grad():
            h = run_with(lm, {}, kl_batch)
            kl_ref = lm_head_logits(lm.model, h[kl_rows, kl_last]).float().log_softmax(-1)
    losses, steps = [], 0
    for it in range(hp.steps + 1):
        opt.zero_grad()
        cur = {n: _full(w0[n], idx[n], theta[n]) for n in names}
        nll_rows = tg.nll_rows(lm, run_with(lm, cur, tg.batch))
        nll = nll_rows.mean()
        loss = nll
        rec = dict(step=it, nll=nll.item(), p_target=float(torch.exp(-nll_rows.detach()).mean()),
                   p_bare=float(torch.exp(-nll_rows[0].detach())))
        if kl_batch is not None:
            h = run_with(lm, cur, kl_batch)
            lp = lm_head_logits(lm.model, h[kl_rows, kl_last]).float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(lp, kl_ref, log_target=True, reduction="batchmean")
            loss = loss + hp.kl_factor * kl
            rec["kl"] = kl.item()
        if hp.l2:
            l2 = sum(((theta[n] - theta0[n]) ** 2).sum() for n in names)
            loss = loss + hp.l2 * l2
            rec["l2"] = float(l2)
        rec["loss"] = loss.item()
        losses.append(rec)
        if nll.item() < hp.early_stop_loss or it == hp.steps:
            break
        # autograd.grad, not backward(): parameters that require grad keep no .grad
        for t, g in zip(theta.values(), torch.autograd.grad(loss, list(theta.values()))):
            t.grad = g
        opt.step()
        steps += 1
    return {n: t.detach() for n, t in theta.items()}, losses, steps


# -- the editor -------------------------------------------------------------------------------
def apply(lm, request: EditRequest | dict, hparams: KNEHparams | None = None,
          method: str = "KNE") -> KNEEdit:
    """Edit ``lm`` in place; returns an undoable :class:`KNEEdit`.

    ``info``: ``hparams``, ``ensemble_size``, ``ensemble_fraction``, ``threshold``,
    ``attr_tokens`` (``[first, last]`` token indices, start tokens counted, of the subject the
    attribution goes through, located from the template's slot; ``None`` for
    ``attr_positions="all"``),
    ``n_entries`` (all attributed entries), ``per_block`` (``block, entries, fraction,
    neurons``), ``losses``, ``steps``, ``seconds_attr``, ``seconds_opt``, ``seconds``.
    """
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = hparams or KNEHparams.for_model(lm)
    t0 = time.perf_counter()
    weights = ffn_weights(lm, hp.matrices, hp.resolve_blocks(lm.n_blocks))
    if hp.attr_target == "true":
        if not request.target_true:
            raise ValueError("attr_target='true' needs request.target_true")
        attr_tgt = request.target_true
    else:
        attr_tgt = request.target_new
    # the subject located from the template's slot (its text may also occur before the slot)
    prompt, at = fill(request.prompt, request.subject)
    on_subject = hp.attr_positions == "subject"
    scores = attribute(lm, prompt, attr_tgt, weights, hp.ig_steps, hp.signed,
                       subject=request.subject if on_subject else None,
                       subject_start=at if on_subject else None)
    attr_tokens = list(subject_span(lm, prompt, request.subject, at)) if on_subject else None
    flat_idx, thr = select_top(scores, hp.fraction, seed=hp.seed)
    del scores
    n_all = sum(w.numel() for w in weights.values())
    t_attr = time.perf_counter() - t0
    values, losses, steps = optimise(lm, request, weights, flat_idx, hp)
    t_opt = time.perf_counter() - t0 - t_attr

    per_block: dict[int, dict] = {}
    units: dict[int, list] = {}
    for n, w in weights.items():
        b = _block_of(lm, n)
        rec = per_block.setdefault(b, dict(block=b, entries=0, total=0))
        rec["total"] += w.numel()
        if n in flat_idx:
            rec["entries"] += int(flat_idx[n].numel())
            units.setdefault(b, []).append(_units(lm.d_model, tuple(w.shape), flat_idx[n].cpu()))
    for b, rec in per_block.items():
        rec["fraction"] = rec["entries"] / rec["total"]
        us = units.get(b, [])
        rec["neurons"] = (None if any(u is None for u in us)
                          else int(torch.cat(us).unique().numel()) if us else 0)
    size = sum(int(i.numel()) for i in flat_idx.values())
    info = dict(
        request=request.to_dict(), hparams=hp.to_dict(), ensemble_size=size,
        ensemble_fraction=size / n_all, n_entries=n_all, threshold=thr, attr_tokens=attr_tokens,
        matrices=sorted(weights), per_block=[per_block[k] for k in sorted(per_block)],
        losses=losses, steps=steps, seconds_attr=t_attr, seconds_opt=t_opt,
    )
    edit = KNEEdit(lm.model, method, info)
    with edit.undo_on_error():
        for n in flat_idx:
            edit.set_entries(n, flat_idx[n], values[n])
    edit.info["seconds"] = time.perf_counter() - t0
    return edit


def _register() -> None:
    from .editors import register

    @register("kne", params=KNEHparams)
    def _kne(lm, request, hparams=None, **kw):
        if isinstance(hparams, dict):
            hparams = KNEHparams.from_dict(hparams)
        if not isinstance(hparams, KNEHparams):  # e.g. a sweep's shared ROME settings
            hparams = KNEHparams.for_model(lm)
        if kw:
            hparams = hparams.replace(**kw)
        return apply(lm, request, hparams)


_register()
