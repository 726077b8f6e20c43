"""ROME's target vector ``v*``: the delta at the subject's last token, optimised for the
target's NLL (+ KL, weight decay, norm clamp, early stop; STEAM's alignment term through
``align``), one objective at a time (:func:`compute_v`) or many in one batch
(:func:`compute_vs`); :func:`compute_v_reference` is the plain implementation, the tests'
oracle. :mod:`steamviz.edit.rome` re-exports these names.

>>> v = compute_v(lm, prepare(lm, request, hp), hp)                     # doctest: +SKIP
>>> v.delta.shape, v.steps                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from ..core.arch import cache_kwargs, get_module, lm_head_logits, mlp_out_module
from ..core.hooks import hooks
from ..core.forward import blocks_from, space
from ..core.lean import LeanStack
from ..core.lean import unsupported as lean_unsupported
from ..core.tokens import pad, token_ids

from .rome_hparams import ROMEHparams
from .rome_prepare import Prepared


class Align(Protocol):
    """An extra loss on residual streams (STEAM's L_LA): see :mod:`steamviz.edit.steam`."""

    lam: float
    layers: Sequence[int]  # residual-stream layers (output of block l - 1)

    def loss(self, streams: dict[int, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class VResult:
    delta: torch.Tensor
    target: torch.Tensor
    losses: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _run_suffix(lm, prep: Prepared) -> torch.Tensor:
    """Blocks ``hp.block..`` on the suffix tokens, with the prefix from the cache."""
    from transformers import DynamicCache

    from ..core.arch import block_input_to_embeds

    base = get_module(lm.model, lm.adapter.base)
    cache = DynamicCache(ddp_cache_data=prep.prefix_kv)
    emb = block_input_to_embeds(lm.model, prep.h_suffix, prep.pos_suffix)
    with blocks_from(lm.model, prep.hp.block):
        out = base(inputs_embeds=emb, attention_mask=prep.mask4d, position_ids=prep.pos_suffix,
                   use_cache=True, **cache_kwargs(base, cache))
    return out.last_hidden_state




def compute_v(lm, prep: Prepared, hp: ROMEHparams | None = None, align: Align | None = None,
              early_stop_on: str = "rome", lean: bool | None = None,
              norm_ref: torch.Tensor | None = None) -> VResult:
    """Optimise the delta at the edited projection's output (v* = v_init + delta).

    ``align``: an extra loss on residual streams at the predicting position of the rewrite
    prompts (STEAM), weighted by ``align.lam``. ``early_stop_on``: ``"rome"`` (default) stops
    when NLL + KL + decay fall below ``hp.early_stop_loss``, so an alignment term does not
    change when the optimisation stops; ``"total"`` includes it. ``hp.early_stop_loss = 0``
    runs exactly ``hp.v_num_grad_steps`` steps (the matched budget sweeps use).

    Each step runs only the suffix tokens through the blocks above the edited one: block
    ``hp.block`` does not depend on the delta (it is added to its MLP output), so its output is
    computed once. ``lean``: run those blocks through :class:`steamviz.core.lean.LeanStack`
    (Llama, Qwen and Gemma 3 models without hooks on the blocks; the same arithmetic with less
    overhead) -- ``None`` uses it where it applies, ``False`` always uses the model's
    modules, ``True`` raises where it does not apply.

    ``norm_ref``: the vector whose norm the clamp (``clamp_norm_factor * |norm_ref|``) and
    the weight decay (``v_weight_decay * |delta| / |norm_ref|^2``) are relative to.
    ``None`` (ROME): ``prep.v_init``, the edited projection's output. MEMIT passes the
    residual stream leaving block ``hp.block`` at the subject's last token of the bare prompt
    (its ``target_init``); the delta itself is added at the same place either way (adding
    it to block ``hp.block``'s MLP output or to the block's output is the same for every
    later block).

    Several objectives of one request at once (a lambda sweep, anchor seeds, ROME beside
    STEAM): :func:`compute_vs`.
    """
    return compute_vs(lm, prep, hp, [align], early_stop_on, lean, norm_ref)[0]


def _tile(x, g: int):
    """``x`` repeated ``g`` times along its first dimension (tuples and None kept)."""
    if g == 1 or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_tile(t, g) for t in x)
    return x.repeat(g, *([1] * (x.dim() - 1)))


def compute_vs(lm, prep: Prepared, hp: ROMEHparams | None = None, aligns=(None,),
               early_stop_on: str = "rome", lean: bool | None = None,
               norm_ref: torch.Tensor | None = None) -> list[VResult]:
    """:func:`compute_v` for several objectives of one request in one optimisation: one
    delta per entry of ``aligns`` (``None``: plain ROME), each on its own copy of the rows,
    in shared forward and backward passes. The groups do not interact: each has its own
    loss, early stop, norm clamp and Adam state (Adam is elementwise), so each result
    equals :func:`compute_v` with that ``align`` up to float rounding (larger matrix
    products sum in another order). A group that stops early keeps its delta while the
    others go on. ``seconds`` of each result is the shared time divided by the groups.
    """
    hp = hp or prep.hp
    if early_stop_on not in ("total", "rome"):
        raise ValueError(f"early_stop_on must be 'total' or 'rome', got {early_stop_on!r}")
    aligns = list(aligns)
    if not aligns:
        raise ValueError("compute_vs needs at least one objective (None: plain ROME)")
    t0 = time.perf_counter()
    model = lm.model
    dev = lm.device
    B = prep.hp.block
    G = len(aligns)
    blocks = get_module(model, lm.adapter.blocks)
    mod = mlp_out_module(model, B)
    delta = torch.zeros((G, *prep.v_init.shape), dtype=prep.v_init.dtype, device=dev,
                        requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    n_rw = prep.n_rewrite
    R = prep.h_suffix.shape[0]  # rows of one group
    n_kl = R - n_rw
    onehot = torch.zeros((G * R, prep.h_suffix.shape[1]), device=dev)
    onehot[:, 0] = 1.0  # the suffix starts at the subject's last token
    onehot = onehot[..., None]
    if norm_ref is None:
        target_norm = prep.v_init.norm()
    else:
        if tuple(norm_ref.shape) != tuple(prep.v_init.shape):
            raise ValueError(f"norm_ref has shape {tuple(norm_ref.shape)}; the delta has "
                             f"{tuple(prep.v_init.shape)}")
        target_norm = norm_ref.detach().to(prep.v_init.device, prep.v_init.dtype).norm()
    max_norm = hp.clamp_norm_factor * target_norm
    # lam = 0 records L_LA without changing the optimisation
    align_layers = sorted({x for a in aligns if a is not None for x in a.layers})
    bad = [x for x in align_layers if not B + 1 <= x <= lm.n_blocks]
    if bad:
        raise ValueError(
            f"alignment layers {bad} are not above the edited block {B}: the delta cannot "
            f"move them; use layers {B + 1}..{lm.n_blocks}"
        )
    streams: dict[int, torch.Tensor] = {}
    offs = torch.arange(G, device=dev) * R  # first row of each group
    rw_rows = (offs[:, None] + torch.arange(n_rw, device=dev)).reshape(-1)
    pred_pos = prep.pred_pos.repeat(G)
    kl_rows = (offs[:, None] + torch.arange(n_rw, R, device=dev)).reshape(-1)
    kl_pos = prep.kl_pos.repeat(G)
    tgt_rows = (offs[:, None] + prep.tgt_rows[None]).reshape(-1)
    tgt_pos, tgt_ids = prep.tgt_pos.repeat(G), prep.tgt_ids.repeat(G)
    n_tgt = prep.tgt_rows.shape[0]
    mask4d = _tile(prep.mask4d, G)
    prefix_kv = [_tile(kv, G) for kv in prep.prefix_kv]

    def row_delta():
        return (onehot * delta.repeat_interleave(R, dim=0)[:, None, :])

    why = (lean_unsupported(model, B, length=prep.mask4d.shape[-1]) if lean is not False
           else "turned off")
    if lean and why:
        raise ValueError(f"lean=True but the lean forward does not apply: {why}")
    if hp.v_matmul_dtype and why:
        raise ValueError(f"v_matmul_dtype={hp.v_matmul_dtype!r} needs the lean forward, which does "
                         f"not apply here ({why}); set v_matmul_dtype to null")
    handles = []
    if why is None:
        md = getattr(torch, hp.v_matmul_dtype) if hp.v_matmul_dtype else None
        stack = LeanStack(model, B, matmul_dtype=md)
        cos, sin = stack.rope(prep.h_suffix, prep.pos_suffix)
        with torch.no_grad():  # block B's parts do not depend on the delta
            h_mid, mlp_out = stack.parts(0, prep.h_suffix, cos, sin, prep.prefix_kv[B],
                                         prep.mask4d)
            h_after = _tile(stack.join(0, h_mid, mlp_out), G)
            if stack.gemma:
                h_mid, mlp_out = _tile(h_mid, G), _tile(mlp_out, G)
        cos, sin = _tile(cos, G), _tile(sin, G)
        wanted = set(align_layers)

        def tap(layer, h):
            if layer in wanted:
                streams[layer] = h[rw_rows, pred_pos]

        def forward():
            if stack.gemma:  # the delta adds to the MLP's output, before its norm
                h = stack.join(0, h_mid, mlp_out + row_delta().to(mlp_out.dtype))
            else:  # (the MLP's output joins the stream as it is: the same, in one sum)
                h = h_after + row_delta().to(h_after.dtype)
            tap(B + 1, h)
            return stack.run(h, cos, sin, prefix_kv, mask4d, first=1, tap=tap)
    else:
        tiled = dataclasses.replace(prep, h_suffix=_tile(prep.h_suffix, G),
                                    pos_suffix=_tile(prep.pos_suffix, G), mask4d=mask4d,
                                    prefix_kv=prefix_kv)

        def add_delta(m, args, out):
            return out + row_delta().to(out.dtype)

        handles.append(mod.register_forward_hook(add_delta))
        for layer in align_layers:
            handles.append(
                blocks[layer - 1].register_forward_hook(
                    lambda m, a, o, layer=layer: streams.__setitem__(
                        layer, (o[0] if isinstance(o, tuple) else o)[rw_rows, pred_pos]
                    )
                )
            )

        def forward():
            return _run_suffix(lm, tiled)
    losses: list[list[dict]] = [[] for _ in range(G)]
    steps = [0] * G
    active = list(range(G))
    frozen = torch.zeros(G, dtype=torch.bool, device=dev)
    kept = torch.zeros_like(delta)  # the final delta of each stopped group
    with hooks(handles):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            h = forward()
            logits = lm_head_logits(model, h[tgt_rows, tgt_pos]).float()
            lp = logits.log_softmax(-1).gather(1, tgt_ids[:, None])[:, 0].view(G, n_tgt)
            nll = -(lp * prep.tgt_weight).sum(1) / n_rw  # [G]
            kl_logits = lm_head_logits(model, h[kl_rows, kl_pos]).float()
            # ROME's essence term, argument order as ROME/EasyEdit: KL(P_edited || P_init)
            kl = hp.kl_factor * torch.nn.functional.kl_div(
                _tile(prep.kl_logp_init, G), kl_logits.log_softmax(-1), log_target=True,
                reduction="none",
            ).view(G, n_kl, -1).sum((1, 2)) / n_kl  # [G] ("batchmean" per group)
            wd = hp.v_weight_decay * (delta.norm(dim=-1) / target_norm**2)  # [G]
            loss = nll + kl + wd
            total_all = []
            go = []
            for g in active:
                a = aligns[g]
                rec = dict(step=it, nll=nll[g].item(), kl=kl[g].item(), decay=wd[g].item())
                total = loss[g]
                if a is not None:
                    la = a.loss({x: streams[x][g * n_rw:(g + 1) * n_rw] for x in a.layers})
                    rec["align"] = la.item()
                    if a.lam != 0:
                        total = total + a.lam * la
                rec["loss"] = total.item()
                rec["p_target"] = float(torch.exp(-nll[g].detach()))
                losses[g].append(rec)
                stop_val = total if early_stop_on == "total" else loss[g]
                if stop_val.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    with torch.no_grad():
                        kept[g] = delta[g]
                    frozen[g] = True
                else:
                    go.append(g)
                    total_all.append(total)
            active = go
            if not active:
                break
            torch.stack(total_all).sum().backward()
            opt.step()
            with torch.no_grad():
                for g in active:
                    steps[g] += 1
                    n = delta[g].norm()
                    if n > max_norm:
                        delta[g].mul_(max_norm / n)
                delta[frozen] = kept[frozen]  # Adam's momentum must not move a stopped group
    delta = delta.detach()
    secs = (time.perf_counter() - t0) / G
    return [VResult(delta=delta[g].clone(), target=prep.v_init + delta[g], losses=losses[g],
                    steps=steps[g], seconds=secs) for g in range(G)]


def _reference_positions(lm, prep: Prepared, hp: ROMEHparams):
    """The oracle's own token positions, found as ROME's ``find_fact_lookup_idx`` does (the
    length of the tokenized text up to the end of the subject), independently of
    :func:`prepare`: the subject's last token per row, each target token's predicting
    position, and where the KL prompts' distribution is read."""
    req, dev, n0 = prep.request, lm.device, len(lm.prefix_ids)
    target = token_ids(lm, space(req.target_new))
    templates = [c.replace("{}", req.prompt) for c in prep.contexts] + list(hp.kl_prompts)
    sp, ends = [], []
    for t in templates:
        head = t[: t.index("{}")] + req.subject
        sp.append(n0 + len(token_ids(lm, head)) - 1)
        ends.append(n0 + len(token_ids(lm, t.replace("{}", req.subject))) - 1)
    n_rw = prep.n_rewrite
    abs_tgt = [ends[r] + j for r in range(n_rw) for j in range(len(target))]
    abs_kl = sp[n_rw:] if hp.kl_position == "subject_last" else ends[n_rw:]
    t = lambda x: torch.tensor(x, device=dev)  # noqa: E731
    return t(sp), t(abs_tgt), t(abs_kl)


def compute_v_reference(lm, prep: Prepared, hp: ROMEHparams | None = None) -> VResult:
    """The plain implementation (as the ROME / EasyEdit code does it): every step runs the
    whole model on the full rows and computes logits at every position. Used as the
    benchmark baseline and as a test oracle for :func:`compute_v`."""
    hp = hp or prep.hp
    t0 = time.perf_counter()
    model, dev = lm.model, lm.device
    mod = mlp_out_module(model, prep.hp.block)
    batch = pad(prep.ids, lm.tok.pad_token_id, dev)
    n_rw = prep.n_rewrite
    sp = torch.tensor(prep.subj_pos, device=dev)
    rows = torch.arange(len(prep.ids), device=dev)
    delta = torch.zeros_like(prep.v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    target_norm = prep.v_init.norm()
    max_norm = hp.clamp_norm_factor * target_norm

    def add_delta(m, args, out):
        out = out.clone()
        out[rows, sp] += delta
        return out

    sp, abs_tgt, abs_kl = _reference_positions(lm, prep, prep.hp)
    losses, steps = [], 0
    with hooks([mod.register_forward_hook(add_delta)]):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False).logits.float()
            lp = logits.log_softmax(-1)[prep.tgt_rows, abs_tgt].gather(1, prep.tgt_ids[:, None])
            nll = -(lp[:, 0] * prep.tgt_weight).sum() / n_rw
            kl_lp = logits[rows[n_rw:], abs_kl].log_softmax(-1)
            kl = hp.kl_factor * torch.nn.functional.kl_div(  # KL(P_edited || P_init)
                prep.kl_logp_init, kl_lp, log_target=True, reduction="batchmean")
            wd = hp.v_weight_decay * (delta.norm() / target_norm**2)
            loss = nll + kl + wd
            losses.append(dict(step=it, nll=nll.item(), kl=kl.item(), loss=loss.item()))
            if loss.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    delta = delta.detach()
    return VResult(delta=delta, target=prep.v_init + delta, losses=losses, steps=steps,
                   seconds=time.perf_counter() - t0)
