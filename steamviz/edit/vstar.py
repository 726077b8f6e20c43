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


def _pad_rows(prep: Prepared, P: int, S: int) -> dict:
    """``prep``'s suffix rows laid out for a prefix of ``P`` and a suffix of ``S`` tokens
    (its own: ``P_i``, ``S_i`` at most those): prefix keys left-padded, suffix tokens
    right-padded, every padded key hidden and every padded query seeing only itself, so
    the real tokens compute what they compute alone (up to float rounding)."""
    R, S_i, _ = prep.h_suffix.shape
    P_i = prep.mask4d.shape[-1] - S_i
    if (P_i, S_i) == (P, S):
        return dict(h=prep.h_suffix, pos=prep.pos_suffix, mask=prep.mask4d, kv=prep.prefix_kv)
    m = prep.mask4d
    mask = torch.full((R, 1, S, P + S), torch.finfo(m.dtype).min, dtype=m.dtype, device=m.device)
    mask[:, :, :S_i, P - P_i:P] = m[:, :, :, :P_i]
    mask[:, :, :S_i, P:P + S_i] = m[:, :, :, P_i:]
    idx = torch.arange(S_i, S, device=m.device)
    mask[:, 0, idx, P + idx] = 0.0  # a padded query sees itself only
    h = torch.nn.functional.pad(prep.h_suffix, (0, 0, 0, S - S_i))
    pos = torch.nn.functional.pad(prep.pos_suffix, (0, S - S_i))
    kv = [(None, None) if k is None else
          (torch.nn.functional.pad(k, (0, 0, P - P_i, 0)), torch.nn.functional.pad(v, (0, 0, P - P_i, 0)))
          for k, v in prep.prefix_kv]
    return dict(h=h, pos=pos, mask=mask, kv=kv)


def _cat(parts: list):
    """Concatenate along rows (tuples and None kept; one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    x = parts[0]
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_cat([p[i] for p in parts]) for i in range(len(x)))
    return torch.cat(parts)


def compute_vs(lm, prep: Prepared | Sequence[Prepared], hp: ROMEHparams | None = None,
               aligns=(None,), early_stop_on: str = "rome", lean: bool | None = None,
               norm_ref=None) -> list[VResult]:
    """:func:`compute_v` for several objectives in one optimisation: one delta per entry of
    ``aligns`` (``None``: plain ROME), each on its own copy of its request's rows, in shared
    forward and backward passes. ``prep``: one request's preparation (a lambda sweep,
    anchor seeds, ROME beside STEAM) or one per objective (MEMIT's batch: many requests,
    each its own delta); ``norm_ref`` likewise one tensor (or None) or one per objective.
    Requests of different lengths are padded (hidden keys, see :func:`_pad_rows`).

    The groups do not interact: each has its own loss, early stop, norm clamp and Adam state
    (Adam is elementwise), so each result equals :func:`compute_v` with that request and
    ``align`` up to float rounding (larger matrix products sum in another order). A group
    that stops early keeps its delta and leaves the batch; the others go on. ``seconds`` of
    each result is the shared time divided by the groups.
    """
    aligns = list(aligns)
    if not aligns:
        raise ValueError("compute_vs needs at least one objective (None: plain ROME)")
    G = len(aligns)
    preps = list(prep) if isinstance(prep, (list, tuple)) else [prep] * G
    refs = list(norm_ref) if isinstance(norm_ref, (list, tuple)) else [norm_ref] * G
    if len(preps) != G or len(refs) != G:
        raise ValueError(f"{G} objectives but {len(preps)} preparations and {len(refs)} norm "
                         f"references: give one each (or one for all)")
    hp = hp or preps[0].hp
    if early_stop_on not in ("total", "rome"):
        raise ValueError(f"early_stop_on must be 'total' or 'rome', got {early_stop_on!r}")
    t0 = time.perf_counter()
    model = lm.model
    dev = lm.device
    B = preps[0].hp.block
    uniq: list[Prepared] = []  # the distinct preparations, in order of first use
    for p in preps:
        if not any(p is q for q in uniq):
            uniq.append(p)
    which = [next(i for i, q in enumerate(uniq) if q is p) for p in preps]  # group -> uniq
    R, n_rw = uniq[0].h_suffix.shape[0], uniq[0].n_rewrite
    for p in uniq:
        if p.hp.block != B or p.h_suffix.shape[0] != R or p.n_rewrite != n_rw:
            raise ValueError("compute_vs: every preparation must edit the same block with the "
                             "same context and KL prompts (prepare them with one hparams)")
    n_kl = R - n_rw
    S = max(p.h_suffix.shape[1] for p in uniq)
    P = max(p.mask4d.shape[-1] - p.h_suffix.shape[1] for p in uniq)
    rows = [_pad_rows(p, P, S) for p in uniq]
    n_tgt = max(p.tgt_rows.shape[0] for p in uniq)
    padded_tgt = any(p.tgt_rows.shape[0] != n_tgt for p in uniq)

    def tgt_pad(x, fill):
        return torch.nn.functional.pad(x, (0, n_tgt - x.shape[0]), value=fill)

    tgt_valid = torch.stack([tgt_pad(torch.ones_like(p.tgt_weight, dtype=torch.bool), False)
                             for p in uniq])
    v_init = torch.stack([p.v_init for p in preps])  # [G, d]
    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    norms = []
    for p, ref in zip(preps, refs):
        if ref is None:
            norms.append(p.v_init.norm())
            continue
        if tuple(ref.shape) != tuple(p.v_init.shape):
            raise ValueError(f"norm_ref has shape {tuple(ref.shape)}; the delta has "
                             f"{tuple(p.v_init.shape)}")
        norms.append(ref.detach().to(p.v_init.device, p.v_init.dtype).norm())
    target_norm = torch.stack(norms)  # [G]
    max_norm = hp.clamp_norm_factor * target_norm
    # lam = 0 records L_LA without changing the optimisation
    align_layers = sorted({x for a in aligns if a is not None for x in a.layers})
    bad = [x for x in align_layers if not B + 1 <= x <= lm.n_blocks]
    if bad:
        raise ValueError(
            f"alignment layers {bad} are not above the edited block {B}: the delta cannot "
            f"move them; use layers {B + 1}..{lm.n_blocks}"
        )
    why = (lean_unsupported(model, B, length=P + S) if lean is not False else "turned off")
    if lean and why:
        raise ValueError(f"lean=True but the lean forward does not apply: {why}")
    if hp.v_matmul_dtype and why:
        raise ValueError(f"v_matmul_dtype={hp.v_matmul_dtype!r} needs the lean forward, which does "
                         f"not apply here ({why}); set v_matmul_dtype to null")
    stack = None
    parts = []  # per distinct preparation: what block B gives (it does not depend on the delta)
    if why is None:
        md = getattr(torch, hp.v_matmul_dtype) if hp.v_matmul_dtype else None
        stack = LeanStack(model, B, matmul_dtype=md)
        for r in rows:
            cos, sin = stack.rope(r["h"], r["pos"])
            with torch.no_grad():
                h_mid, mlp_out = stack.parts(0, r["h"], cos, sin, r["kv"][B], r["mask"])
                parts.append(dict(cos=cos, sin=sin, mid=h_mid, mlp=mlp_out,
                                  after=stack.join(0, h_mid, mlp_out)))

    def layout(live: list[int]) -> dict:
        """The batch of the groups in ``live``: their rows, side by side."""
        g_of = [which[g] for g in live]
        n = len(live)
        off = torch.arange(n, device=dev) * R
        L = dict(n=n, live=torch.tensor(live, device=dev),
                 mask=_cat([rows[i]["mask"] for i in g_of]),
                 kv=[_cat([rows[i]["kv"][b] for i in g_of]) for b in range(len(rows[0]["kv"]))],
                 rw_rows=(off[:, None] + torch.arange(n_rw, device=dev)).reshape(-1),
                 pred_pos=torch.cat([uniq[i].pred_pos for i in g_of]),
                 kl_rows=(off[:, None] + torch.arange(n_rw, R, device=dev)).reshape(-1),
                 kl_pos=torch.cat([uniq[i].kl_pos for i in g_of]),
                 kl_init=_cat([uniq[i].kl_logp_init for i in g_of]),
                 tgt_rows=(off[:, None] + torch.stack(
                     [tgt_pad(uniq[i].tgt_rows, 0) for i in g_of])).reshape(-1),
                 tgt_pos=torch.cat([tgt_pad(uniq[i].tgt_pos, 0) for i in g_of]),
                 tgt_ids=torch.cat([tgt_pad(uniq[i].tgt_ids, 0) for i in g_of]),
                 tgt_weight=torch.stack([tgt_pad(uniq[i].tgt_weight, 0.0) for i in g_of]),
                 tgt_valid=tgt_valid[g_of])
        onehot = torch.zeros((n * R, S), device=dev)
        onehot[:, 0] = 1.0  # the suffix starts at the subject's last token
        L["onehot"] = onehot[..., None]
        if stack is not None:
            for k in ("cos", "sin"):
                L[k] = tuple(_cat([parts[i][k][t] for i in g_of]) for t in range(len(stack.types)))
            for k in ("mid", "mlp", "after"):
                L[k] = _cat([parts[i][k] for i in g_of])
        else:
            L["prep"] = dataclasses.replace(
                uniq[0], h_suffix=_cat([rows[i]["h"] for i in g_of]),
                pos_suffix=_cat([rows[i]["pos"] for i in g_of]), mask4d=L["mask"],
                prefix_kv=L["kv"])
        return L

    streams: dict[int, torch.Tensor] = {}
    wanted = set(align_layers)
    handles = []
    L = layout(list(range(G)))

    def row_delta():
        return L["onehot"] * delta[L["live"]].repeat_interleave(R, dim=0)[:, None, :]

    if stack is not None:
        def tap(layer, h):
            if layer in wanted:
                streams[layer] = h[L["rw_rows"], L["pred_pos"]]

        def forward():
            if stack.gemma:  # the delta adds to the MLP's output, before its norm
                h = stack.join(0, L["mid"], L["mlp"] + row_delta().to(L["mlp"].dtype))
            else:  # (the MLP's output joins the stream as it is: the same, in one sum)
                h = L["after"] + row_delta().to(L["after"].dtype)
            tap(B + 1, h)
            return stack.run(h, L["cos"], L["sin"], L["kv"], L["mask"], first=1, tap=tap)
    else:
        blocks = get_module(model, lm.adapter.blocks)

        def add_delta(m, args, out):
            return out + row_delta().to(out.dtype)

        handles.append(mlp_out_module(model, B).register_forward_hook(add_delta))
        for layer in align_layers:
            handles.append(
                blocks[layer - 1].register_forward_hook(
                    lambda m, a, o, layer=layer: streams.__setitem__(
                        layer, (o[0] if isinstance(o, tuple) else o)[L["rw_rows"], L["pred_pos"]]
                    )
                )
            )

        def forward():
            return _run_suffix(lm, L["prep"])
    losses: list[list[dict]] = [[] for _ in range(G)]
    steps = [0] * G
    active = list(range(G))
    frozen = torch.zeros(G, dtype=torch.bool, device=dev)
    kept = torch.zeros_like(delta)  # the final delta of each stopped group
    with hooks(handles):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            h = forward()
            n = L["n"]
            logits = lm_head_logits(model, h[L["tgt_rows"], L["tgt_pos"]]).float()
            lp = logits.log_softmax(-1).gather(1, L["tgt_ids"][:, None])[:, 0].view(n, n_tgt)
            if padded_tgt:
                lp = lp.masked_fill(~L["tgt_valid"], 0.0)
            nll = -(lp * L["tgt_weight"]).sum(1) / n_rw  # [n]
            kl_logits = lm_head_logits(model, h[L["kl_rows"], L["kl_pos"]]).float()
            # ROME's essence term, argument order as ROME/EasyEdit: KL(P_edited || P_init)
            kl = hp.kl_factor * torch.nn.functional.kl_div(
                L["kl_init"], kl_logits.log_softmax(-1), log_target=True,
                reduction="none",
            ).view(n, n_kl, -1).sum((1, 2)) / n_kl  # [n] ("batchmean" per group)
            live = L["live"]
            wd = hp.v_weight_decay * (delta[live].norm(dim=-1) / target_norm[live]**2)  # [n]
            loss = nll + kl + wd
            total_all = []
            go = []
            for j, g in enumerate(active):
                a = aligns[g]
                rec = dict(step=it, nll=nll[j].item(), kl=kl[j].item(), decay=wd[j].item())
                total = loss[j]
                if a is not None:
                    la = a.loss({x: streams[x][j * n_rw:(j + 1) * n_rw] for x in a.layers})
                    rec["align"] = la.item()
                    if a.lam != 0:
                        total = total + a.lam * la
                rec["loss"] = total.item()
                rec["p_target"] = float(torch.exp(-nll[j].detach()))
                losses[g].append(rec)
                stop_val = total if early_stop_on == "total" else loss[j]
                if stop_val.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    with torch.no_grad():
                        kept[g] = delta[g]
                    frozen[g] = True
                else:
                    go.append(g)
                    total_all.append(total)
            if not go:
                break
            torch.stack(total_all).sum().backward()
            if go != active:  # the stopped groups leave the batch
                L = layout(go)
            active = go
            opt.step()
            with torch.no_grad():
                for g in active:
                    steps[g] += 1
                    nm = delta[g].norm()
                    if nm > max_norm[g]:
                        delta[g].mul_(max_norm[g] / nm)
                delta[frozen] = kept[frozen]  # Adam's momentum must not move a stopped group
    delta = delta.detach()
    secs = (time.perf_counter() - t0) / G
    return [VResult(delta=delta[g].clone(), target=preps[g].v_init + delta[g], losses=losses[g],
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
