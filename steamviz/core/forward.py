"""Forward passes steamviz needs: from a cached block up, target log-probs, greedy text.

>>> lp = target_logprobs(lm, ["The capital of France is"], [" Paris"])   # doctest: +SKIP
>>> greedy(lm, ["The capital of France is"], max_new_tokens=3)         # doctest: +SKIP
[' Paris. It']
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .arch import block_input_to_embeds, cache_kwargs, get_module, lm_head_logits, output_cache
from .tokens import encode, pad, token_ids


@contextmanager
def blocks_from(model: nn.Module, start: int) -> Iterator[None]:
    """Temporarily make the decoder stack hold only blocks ``start..`` (restored on exit).

    Per-block config lists (``config.layer_types``: sliding vs full attention) are shifted
    the same way, so each block keeps its own attention type.
    """
    from .arch import adapter_for

    ad = adapter_for(model)
    parent_path, _, attr = ad.blocks.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    orig = getattr(parent, attr)
    cfg = model.config
    orig_types = getattr(cfg, "layer_types", None)
    setattr(parent, attr, nn.ModuleList(list(orig)[start:]))
    if orig_types is not None:
        cfg.layer_types = list(orig_types)[start:]
    try:
        yield
    finally:
        setattr(parent, attr, orig)
        if orig_types is not None:
            cfg.layer_types = orig_types


def run_from_block(
    lm, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run blocks ``start..`` on ``hidden`` (the residual stream entering block ``start``,
    ``[batch, seq, d]``) and return the stack's output (final norm applied) ``[batch, seq, d]``.

    Equivalent to the full forward pass when ``hidden`` is the cached ``start``-layer
    stream; lets an optimisation loop skip the blocks below an edit (tested per arch).
    """
    base = get_module(lm.model, lm.adapter.base)
    T = hidden.shape[1]
    pos = torch.arange(T, device=hidden.device)[None].expand(hidden.shape[0], T)
    emb = block_input_to_embeds(lm.model, hidden, pos)
    with blocks_from(lm.model, start):
        out = base(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos,
                   use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def with_targets(lm, prompts: Sequence[str], targets: Sequence[str]):
    """Batch of ``prompt + target`` and, per row, the positions that predict target tokens."""
    seqs, tpos, tids = [], [], []
    for p, t in zip(prompts, targets):
        pi = list(lm.prefix_ids) + token_ids(lm, p)
        ti = token_ids(lm, t)
        if not ti:
            raise ValueError(f"target {t!r} tokenizes to nothing")
        seqs.append(pi + ti)
        tpos.append(list(range(len(pi) - 1, len(pi) - 1 + len(ti))))
        tids.append(ti)
    return pad(seqs, lm.tok.pad_token_id, lm.device), tpos, tids


def space(t: str) -> str:
    """Answers are completed after a space: ``"Paris" -> " Paris"``."""
    return t if t.startswith(" ") else " " + t


@torch.no_grad()
def target_logprobs(
    lm, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> list[dict]:
    """Teacher-forced log-probability of each target after its prompt.

    Returns per pair: ``logprob`` (sum over target tokens), ``mean_logprob``, ``prob``
    (exp of the sum), ``first_prob`` (of the first token), ``first_rank`` (how many tokens
    the model puts above the first target token: 0 = its first choice), ``greedy`` (every
    target token is the argmax: the model would generate it). Targets get a leading space if they lack one.
    """
    out: list[dict] = []
    base = get_module(lm.model, lm.adapter.base)
    for s in range(0, len(prompts), batch_size):
        ps, ts = list(prompts[s : s + batch_size]), [space(t) for t in targets[s : s + batch_size]]
        batch, tpos, tids = with_targets(lm, ps, ts)
        h = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        h = h.last_hidden_state
        for i in range(len(ps)):
            logits = lm_head_logits(lm.model, h[i, tpos[i]]).float()
            lp = logits.log_softmax(-1)
            ids = torch.tensor(tids[i], device=lp.device)
            tok_lp = lp[torch.arange(len(ids)), ids]
            out.append(
                dict(
                    logprob=float(tok_lp.sum()),
                    mean_logprob=float(tok_lp.mean()),
                    prob=float(tok_lp.sum().exp()),
                    first_prob=float(tok_lp[0].exp()),
                    first_rank=int((lp[0] > tok_lp[0]).sum()),
                    greedy=bool((logits.argmax(-1) == ids).all()),
                )
            )
    return out


@torch.no_grad()
def next_token_logits(lm, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``[prompt, vocab]`` logits of the token after each prompt."""
    base = get_module(lm.model, lm.adapter.base)
    rows = []
    for s in range(0, len(prompts), batch_size):
        b = encode(lm, list(prompts[s : s + batch_size]))
        h = base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        h = h.last_hidden_state[torch.arange(len(b.lengths)), b.last.to(h.last_hidden_state.device)]
        rows.append(lm_head_logits(lm.model, h).float())
    return torch.cat(rows)


def left_pad(lm, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token id rows left-padded for batched decoding: ``input_ids``, ``attention_mask`` and
    ``position_ids`` ``[rows, T]`` on the model's device (positions count real tokens only)."""
    T = max(len(x) for x in ids)
    inp = torch.full((len(ids), T), int(lm.tok.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, T - len(x) :] = torch.tensor(list(x))
        mask[i, T - len(x) :] = 1
    inp, mask = inp.to(lm.device), mask.to(lm.device)
    return inp, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy(lm, prompts: Sequence[str], max_new_tokens: int = 20, stop_at_eos: bool = True,
           batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt (text after the prompt).

    Batched: prompts are left-padded, positions count real tokens only, and a KV cache
    carries the batch forward one token at a time; equal to one-prompt-at-a-time decoding.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    outs: list[str] = []
    eos = lm.tok.eos_token_id
    dev = lm.device
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids = [list(lm.prefix_ids) + token_ids(lm, p) for p in chunk]
        inp, mask, pos = left_pad(lm, ids)
        past, cur = None, inp
        new = torch.zeros((len(ids), 0), dtype=torch.long, device=dev)
        done = torch.zeros(len(ids), dtype=torch.bool, device=dev)
        for _ in range(max_new_tokens):
            o = lm.model(input_ids=cur, attention_mask=mask, position_ids=pos,
                         use_cache=True, **cache_kwargs(lm.model, past))
            past = output_cache(o)
            nxt = o.logits[:, -1].argmax(-1)
            if stop_at_eos and eos is not None:
                done |= nxt == eos
            new = torch.cat([new, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
            cur = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
            pos = pos[:, -1:] + 1
        for row in new.tolist():
            if stop_at_eos and eos in row:
                row = row[: row.index(eos)]
            outs.append(lm.tok.decode(row))
    return outs
