"""ROME's shared work for one request (:func:`prepare` -> :class:`Prepared`): the context
prompts, the keys ``k*`` and ``k``, the left vector ``u``, and the prefix cache that lets the
target-vector optimisation (:mod:`steamviz.edit.vstar`) run only the tokens and blocks that depend
on the delta. :mod:`steamviz.edit.rome` re-exports these names.

>>> prep = prepare(lm, request, ROMEHparams.for_model(lm))              # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core.memo import memo
from ..core.arch import cache_kwargs, get_module, lm_head_logits, mlp_out_module
from ..core.hooks import Tap, read, stream
from ..core.context import context_templates
from ..core.guard import active_edits
from ..core.forward import space
from ..data.requests import EditRequest
from ..core.tokens import fill, pad, subject_last, token_ids

from .rome_hparams import ROMEHparams


@dataclass
class Prepared:
    """Everything ROME computes before optimising v*; reusable across grid points.

    Rows are the rewrite prompts (one per context, + target tokens but the last), then the
    KL prompts. Only tokens from the subject's last token on depend on the delta: the rest
    (the *prefix*) is kept as a key/value cache of every block at and above ``hp.block``, and
    each optimisation step runs only the *suffix* tokens through blocks ``hp.block..``.
    """

    request: EditRequest
    hp: ROMEHparams
    contexts: list[str]
    k_star: torch.Tensor  # [d_in] mean key over contexts
    k_bare: torch.Tensor  # [d_in] key on the bare prompt
    v_init: torch.Tensor  # [d_out] W's output at the subject's last token, bare prompt
    u: torch.Tensor  # [d_in] unit left vector (C^-1 k*)
    n_rewrite: int
    # full rows (for the reference implementation and captures)
    ids: list[list[int]]
    subj_pos: list[int]
    # suffix view: tokens from the subject's last token on, right-padded
    h_suffix: torch.Tensor  # [rows, S, d] stream entering block `hp.block`
    pos_suffix: torch.Tensor  # [rows, S] absolute positions
    mask4d: torch.Tensor  # [rows, 1, S, P + S] additive attention mask
    prefix_kv: list  # per block: (keys, values) [rows, heads, P, hd] (None below `hp.block`)
    tgt_rows: torch.Tensor  # [n_target_tokens]
    tgt_pos: torch.Tensor  # position in the suffix that predicts the token
    tgt_ids: torch.Tensor
    tgt_weight: torch.Tensor  # 1 / n target tokens of the row, so prompts weigh equally
    pred_pos: torch.Tensor  # [n_rewrite] suffix position predicting the first target token
    kl_pos: torch.Tensor  # [n_kl] suffix position of the KL prompts' last token
    kl_logp_init: torch.Tensor  # [n_kl, vocab]
    seconds: float = 0.0



def keys_and_outputs(lm, block: int, prompts: list[str], subjects: list[str], starts=None):
    """Input and output of the edited projection at each prompt's subject-last token
    (``starts``: the subjects' character offsets, :func:`steamviz.core.tokens.fill`)."""
    mod = mlp_out_module(lm.model, block)
    ids = [list(lm.prefix_ids) + token_ids(lm, p) for p in prompts]
    starts = starts or [None] * len(prompts)
    pos = torch.tensor([subject_last(lm, p, s, i) for p, s, i in zip(prompts, subjects, starts)])
    b = pad(ids, lm.tok.pad_token_id, lm.device)
    rows = torch.arange(len(ids), device=lm.device)
    at = pos.to(lm.device)
    got, _ = read(lm, b.input_ids, b.attention_mask,
                  {"kv": Tap(mod, "both", keep=lambda kv: (kv[0][rows, at], kv[1][rows, at]))})
    return got["kv"]


def _prefix_cache(lm, ids: list[list[int]], cut: list[int], block: int):
    """Key/value cache of every block for the tokens before ``cut`` (left-padded to P)
    and the residual stream entering block ``block`` for the tokens from ``cut`` on
    (right-padded to S). One forward pass of the unedited model, which also gives the
    edited projection's input and output at each row's cut and the final hidden states of
    the suffix tokens (second dict)."""
    dev = lm.device
    B = len(ids)
    P = max(cut)
    S = max(len(x) - c for x, c in zip(ids, cut))
    T = P + S
    # lay every row out as [pad.. prefix | suffix ..pad] so prefixes end at P
    inp = torch.full((B, T), int(lm.tok.pad_token_id), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    real = torch.zeros((B, T), dtype=torch.bool)
    for i, (x, c) in enumerate(zip(ids, cut)):
        inp[i, P - c : P - c + len(x)] = torch.tensor(x)
        pos[i, P - c : P - c + len(x)] = torch.arange(len(x))
        real[i, P - c : P - c + len(x)] = True
    # additive mask: causal by layout index, padded keys hidden, every query sees itself
    idx = torch.arange(T)
    allow = (idx[None, :] <= idx[:, None])[None] & real[:, None, :]
    allow |= torch.eye(T, dtype=torch.bool)[None]
    dtype = next(lm.model.parameters()).dtype
    neg = torch.finfo(dtype).min
    full_mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allow[:, None], neg)
    from transformers import DynamicCache

    base = get_module(lm.model, lm.adapter.base)
    cache = DynamicCache()
    taps = {"h": stream(lm, block),  # stream layer ``block`` enters block ``block``
            "kv": Tap(mlp_out_module(lm.model, block), "both",  # the projection at the cut
                      keep=lambda kv: (kv[0][:, P], kv[1][:, P]))}
    got, out = read(lm, inp.to(dev), full_mask.to(dev), taps, stop=False,
                    position_ids=pos.to(dev), use_cache=True, **cache_kwargs(base, cache))
    got["k"], got["v"] = got["kv"]
    kv = []
    for i, lay in enumerate(cache.layers):
        if i < block:
            kv.append((None, None))
        else:
            kv.append((lay.keys[:, :, :P].detach(), lay.values[:, :, :P].detach()))
    return dict(
        h_suffix=got["h"][:, P:], pos_suffix=pos[:, P:].to(dev),
        mask4d=full_mask[:, :, P:, :].to(dev), prefix_kv=kv,
    ), dict(keys=got["k"], outs=got["v"], last=out.last_hidden_state[:, P:])


_PREP_CACHE: dict[tuple, Prepared] = memo("rome.prepared")


def _check_window(lm, rows: list[list[int]]) -> None:
    """The prefix-cache path uses one causal mask for every block; with sliding-window
    layers that is exact only while every row fits the window."""
    cfg = lm.model.config
    win = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if win and "sliding_attention" in types and max(len(r) for r in rows) > win:
        raise NotImplementedError(
            f"rows of {max(len(r) for r in rows)} tokens exceed the sliding window ({win}); "
            "use shorter context_template_length_params"
        )


def _left_vector(lm, hp: ROMEHparams, k_star: torch.Tensor) -> torch.Tensor:
    if hp.mom2_adjustment:
        from ..look.stats import inverse, second_moment

        key = ("cinv", lm.fingerprint, hp.block, str(hp.mom2_corpus), hp.mom2_n_tokens, hp.mom2_ridge)
        if key not in _CINV:
            C = second_moment(lm, hp.block, corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens,
                              seed=hp.seed)
            _CINV[key] = inverse(C, hp.mom2_ridge).float()
        u = _CINV[key].to(k_star.device) @ k_star
    else:
        u = k_star.clone()
    return u / u.norm()


_CINV: dict[tuple, torch.Tensor] = memo("rome.cinv")


def prepare(lm, request: EditRequest, hp: ROMEHparams | None = None, use_cache: bool = True
            ) -> Prepared:
    """Keys, C^-1 direction, prefix caches and the KL reference for ``request``."""
    hp = hp or ROMEHparams.for_model(lm)
    if not 0 <= hp.block < lm.n_blocks:
        raise ValueError(f"block {hp.block} out of range: this model has blocks 0..{lm.n_blocks - 1}")
    fields = ("block", "context_template_length_params", "kl_prompts", "kl_position",
              "mom2_adjustment",
              "mom2_corpus", "mom2_n_tokens", "mom2_ridge", "seed")
    key = (lm.fingerprint, id(lm.model), repr(request.to_rome()),
           tuple(getattr(hp, f) for f in fields))
    clean = not active_edits(lm.model)
    if use_cache and clean and key in _PREP_CACHE:
        return _PREP_CACHE[key]
    t0 = time.perf_counter()
    contexts = context_templates(lm, hp.context_template_length_params, seed=hp.seed)
    subj = request.subject
    # keys over contexts (the subject's last token only sees the text up to the subject)
    # (the subject is located from the templates' slots, not by searching its text: a
    # context prefix may contain the subject too)
    inner, at = fill(request.prompt, subj)
    key_prompts = [(text, j + at) for text, j in (fill(c, inner) for c in contexts)]
    target = token_ids(lm, space(request.target_new))
    rows_ids, subj_pos, tgt_rows, tgt_pos, tgt_ids, tgt_w, pred_pos, kl_pos = ([] for _ in range(8))
    for r, (text, start) in enumerate(key_prompts):
        ids = list(lm.prefix_ids) + token_ids(lm, text)
        sp = subject_last(lm, text, subj, start)
        subj_pos.append(sp)
        pred_pos.append(len(ids) - 1 - sp)
        for j, t in enumerate(target):
            tgt_rows.append(r)
            tgt_pos.append(len(ids) - 1 + j - sp)
            tgt_ids.append(t)
            tgt_w.append(1.0 / len(target))
        rows_ids.append(ids + target[:-1])
    for kp in hp.kl_prompts:
        text, start = fill(kp, subj)
        ids = list(lm.prefix_ids) + token_ids(lm, text)
        sp = subject_last(lm, text, subj, start)
        subj_pos.append(sp)
        kl_pos.append(0 if hp.kl_position == "subject_last" else len(ids) - 1 - sp)
        rows_ids.append(ids)
    dev = lm.device
    _check_window(lm, rows_ids)
    pc, seen = _prefix_cache(lm, rows_ids, subj_pos, hp.block)
    # keys: the subject's last token only sees the text up to the subject, so the rewrite
    # rows (context + prompt + target) give the same keys as the bare key prompts
    keys, outs = seen["keys"][: len(contexts)], seen["outs"][: len(contexts)]
    k_star = keys.mean(0)
    k_bare, v_init = keys[0], outs[0]  # contexts[0] == "{}": the bare prompt
    u = _left_vector(lm, hp, k_star)
    t = lambda x: torch.tensor(x, device=dev)  # noqa: E731
    prep = Prepared(
        request=request, hp=hp, contexts=contexts, k_star=k_star, k_bare=k_bare, v_init=v_init,
        u=u, n_rewrite=len(contexts), ids=rows_ids, subj_pos=subj_pos, **pc,
        tgt_rows=t(tgt_rows), tgt_pos=t(tgt_pos), tgt_ids=t(tgt_ids), tgt_weight=t(tgt_w),
        pred_pos=t(pred_pos), kl_pos=t(kl_pos), kl_logp_init=torch.empty(0),
    )
    with torch.no_grad():
        kl_rows = torch.arange(prep.n_rewrite, len(rows_ids), device=dev)
        h = seen["last"][kl_rows, prep.kl_pos]
        prep.kl_logp_init = lm_head_logits(lm.model, h).float().log_softmax(-1)
    prep.seconds = time.perf_counter() - t0
    if use_cache and clean:
        _PREP_CACHE[key] = prep
        while len(_PREP_CACHE) > 64:
            _PREP_CACHE.pop(next(iter(_PREP_CACHE)))
    return prep
