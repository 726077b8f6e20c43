"""Context prefixes the model writes itself (ROME's context templates).

ROME averages the subject key over short prefixes so the edit generalises across contexts.
They are sampled from the model (top-k, fixed seed) and cached per model fingerprint.

>>> context_templates(lm)[:2]                      # doctest: +SKIP
['{}', 'The first step in the process. {}']
"""

from __future__ import annotations

import torch

from .memo import memo
from .arch import cache_kwargs, output_cache

_CACHE: dict[tuple, list[str]] = memo("context.templates")


@torch.no_grad()
def sample(lm, n: int, length: int, generator: torch.Generator, top_k: int = 5,
           opener: str = "") -> list[list[int]]:
    """``n`` sequences of ``length`` new token ids after the start tokens and ``opener``
    (top-k sampling); the opener's ids are included in what is returned."""
    start = list(lm.prefix_ids) or [lm.tok.eos_token_id]
    opener_ids = lm.tok(opener, add_special_tokens=False)["input_ids"] if opener else []
    start_len = len(start)
    start = start + list(opener_ids)
    ids = torch.tensor([start] * n, device=lm.device)
    past, cur = None, ids
    for _ in range(length):
        o = lm.model(input_ids=cur, use_cache=True, **cache_kwargs(lm.model, past))
        past = output_cache(o)
        logits = o.logits[:, -1].float().cpu()
        v, i = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(v.softmax(-1), 1, generator=generator)
        nxt = i.gather(1, choice).to(lm.device)
        ids = torch.cat([ids, nxt], dim=1)
        cur = nxt
    return [row.tolist() for row in ids[:, start_len:]]


OPENERS = ("The", "Therefore", "Because", "I", "You")


def context_templates(
    lm, length_params: tuple = ((5, 10), (10, 10)), seed: int = 0, top_k: int = 5,
    openers: tuple = OPENERS,
) -> list[str]:
    """``["{}"] + [f"{text}. {{}}" ...]``: one bare template plus model-written prefixes.

    ``length_params``: ``(n_tokens, n_samples)`` pairs, as ROME's
    ``context_template_length_params``. Samples start from common sentence openers (as
    MEMIT / EasyEdit do), spread round-robin, so a small instruct model writes prose
    rather than markup.
    """
    key = (lm.fingerprint, tuple(map(tuple, length_params)), seed, top_k, tuple(openers))
    if key in _CACHE:
        return list(_CACHE[key])
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = ["{}"]
    for length, n in length_params:
        seqs = []
        for j, op in enumerate(openers or ("",)):
            k = n // len(openers or ("",)) + (1 if j < n % len(openers or ("",)) else 0)
            if k:
                seqs += sample(lm, k, length, g, top_k, opener=op)
        for seq in seqs:
            text = lm.tok.decode(seq, skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ").strip()
            out.append(text + ". {}")
    _CACHE[key] = out
    return list(out)
