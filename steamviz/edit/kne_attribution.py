"""KNE's attribution and ensemble: integrated gradients over the feed-forward weights
(:func:`attribute`, batched through hooks; :func:`attribute_reference` is the plain version,
the tests' oracle) and one global threshold over every attributed entry (:func:`select_top`).
:mod:`steamviz.edit.kne` re-exports these names.
"""

from __future__ import annotations


import torch

from ..core.arch import get_module, lm_head_logits
from ..core.forward import with_targets, space
from ..core.tokens import subject_span


# -- the loss pieces --------------------------------------------------------------------------
def relative(lm, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names relative to the decoder stack (``functional_call`` on ``base``)."""
    pre = lm.adapter.base + "."
    return {k[len(pre):]: v for k, v in params.items()}


def run_with(lm, weights: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """Decoder stack with ``weights`` swapped in: last hidden state ``[B, T, d]``."""
    from torch.func import functional_call

    base = get_module(lm.model, lm.adapter.base)
    out = functional_call(base, relative(lm, weights), (),
                          dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False), strict=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class Targets:
    """Rows ``prompt + target`` with the positions and ids of every target token."""

    def __init__(self, lm, prompts: list[str], target: str):
        self.batch, tpos, tids = with_targets(lm, prompts, [space(target)] * len(prompts))
        dev = lm.device
        self.rows = torch.tensor([i for i, t in enumerate(tpos) for _ in t], device=dev)
        self.pos = torch.tensor([p for t in tpos for p in t], device=dev)
        self.ids = torch.tensor([x for t in tids for x in t], device=dev)
        self.weight = torch.tensor([1.0 / len(t) for t in tids for _ in t], device=dev)
        self.n = len(prompts)

    def nll_rows(self, lm, h: torch.Tensor) -> torch.Tensor:
        """Per row mean NLL of the target tokens ``[n]``."""
        logits = lm_head_logits(lm.model, h[self.rows, self.pos]).float()
        lp = logits.log_softmax(-1).gather(1, self.ids[:, None])[:, 0]
        out = torch.zeros(self.n, device=lp.device, dtype=lp.dtype)
        return out.index_add(0, self.rows, -lp * self.weight)


# -- 1. attribution ---------------------------------------------------------------------------
def attribute(lm, prompt: str, target: str, weights: dict[str, torch.Tensor], steps: int = 16,
              signed: bool = False, batch_size: int = 16, subject: str | None = None,
              subject_start: int | None = None) -> dict[str, torch.Tensor]:
    """Integrated-gradient attribution of ``log P(target | prompt)`` to every entry of
    ``weights`` (scaled jointly from 0 to themselves): ``W * mean_alpha dlogP/dW'`` at
    ``W' = alpha W``, as ``|.|`` unless ``signed``. Same shapes as the weights, float32.

    ``subject``: count only the gradient that flows through the subject's tokens in
    ``prompt`` (the weight gradient summed over those positions only), i.e. the entries'
    effect on the target *via the subject*. ``None``: every position (the full gradient).
    ``subject_start``: the subject's character offset in ``prompt``, where its template's
    ``{}`` slot was (:func:`steamviz.core.tokens.fill`; :func:`apply` passes it). Without it the
    subject's text is searched for and its first occurrence counts -- wrong when text before
    the slot names the subject; only for prompts written without a template.

    Fast path, exact: the weights are not copied. A forward hook turns each matrix's output
    ``W x + b`` into ``alpha (W x) + b`` (= the output with ``alpha W``), one batch row per
    ``alpha`` (``batch_size`` alphas per pass), and the weight gradient is assembled from the
    hooked inputs ``X`` and output gradients ``G``: ``G^T X`` (``[out, in]`` storage) or
    ``X^T G`` (GPT-2's ``Conv1D``), summed over rows and tokens.
    (:func:`attribute_reference` is the plain ``functional_call`` version, the test oracle.)
    """
    from ..core.hooks import hooks

    names = list(weights)
    mods = {n: get_module(lm.model, n.rsplit(".", 1)[0]) for n in names}
    for n in names:
        if getattr(mods[n], "weight", None) is not weights[n]:
            raise ValueError(f"{n} is not the weight of module {n.rsplit('.', 1)[0]}")
    conv1d = lm.adapter.conv1d
    acc = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device)
           for n, w in weights.items()}
    alphas = [(k + 0.5) / steps for k in range(steps)]
    base = get_module(lm.model, lm.adapter.base)
    span = slice(None)
    if subject is not None:
        first, last = subject_span(lm, prompt, subject, subject_start)
        span = slice(first, last + 1)
    elif subject_start is not None:
        raise ValueError("subject_start needs the subject")
    for s in range(0, steps, batch_size):
        chunk = alphas[s : s + batch_size]
        tg = Targets(lm, [prompt] * len(chunk), target)
        a = torch.tensor(chunk, device=lm.device, requires_grad=True)
        xs: dict[str, torch.Tensor] = {}
        ys: dict[str, torch.Tensor] = {}

        def hook(m, args, out, n, a=a, xs=xs, ys=ys):
            b = getattr(m, "bias", None)
            y = out if b is None else out - b
            y = y * a.view(-1, *[1] * (y.dim() - 1)).to(y.dtype)
            if b is not None:
                y = y + b
            xs[n], ys[n] = args[0].detach(), y
            return y

        handles = [mods[n].register_forward_hook(lambda m, ar, o, n=n: hook(m, ar, o, n))
                   for n in names]
        with hooks(handles):
            out = base(input_ids=tg.batch.input_ids, attention_mask=tg.batch.attention_mask,
                       use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logp = -tg.nll_rows(lm, h).sum()
        grads = torch.autograd.grad(logp, [ys[n] for n in names])
        for n, g in zip(names, grads):
            X = xs[n][:, span].reshape(-1, xs[n].shape[-1]).float()
            G = g[:, span].reshape(-1, g.shape[-1]).float()
            acc[n].add_(X.T @ G if conv1d else G.T @ X)
        del grads, out, h
    out_attr = {}
    for n, w in weights.items():
        a_ = acc[n].mul_(w.detach().float()).div_(steps)
        out_attr[n] = a_ if signed else a_.abs_()
    return out_attr


def attribute_reference(lm, prompt: str, target: str, weights: dict[str, torch.Tensor],
                        steps: int = 16, signed: bool = False) -> dict[str, torch.Tensor]:
    """:func:`attribute` the plain way: per ``alpha`` a forward pass with ``alpha W`` swapped
    in (``functional_call``) and ``autograd.grad`` with respect to the scaled weights."""
    tg = Targets(lm, [prompt], target)
    names = list(weights)
    w0 = [weights[n].detach() for n in names]
    acc = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in w0]
    for k in range(steps):
        alpha = (k + 0.5) / steps
        scaled = [(alpha * w).requires_grad_(True) for w in w0]
        logp = -tg.nll_rows(lm, run_with(lm, dict(zip(names, scaled)), tg.batch)).sum()
        for a, g in zip(acc, torch.autograd.grad(logp, scaled)):
            a.add_(g.float())
    out = {}
    for n, w, a in zip(names, w0, acc):
        a.mul_(w.float()).div_(steps)
        out[n] = a if signed else a.abs_()
    return out


# -- 2. ensemble ------------------------------------------------------------------------------
def select_top(scores: dict[str, torch.Tensor], fraction: float, seed: int = 0
               ) -> tuple[dict[str, torch.Tensor], float]:
    """Exactly ``max(1, round(fraction * N))`` entries with the highest score over all
    tensors (``N`` entries in all): one global threshold. Returns ``{name: flat indices}``
    (sorted; names with no selected entry are left out) and the threshold (the score of the
    last selected entry). Ties at the threshold are broken by position.

    Speed: a random sample's quantile gives a lower bound; ``torch.kthvalue`` then runs on
    the entries above it only (the full concatenation if the bound is not low enough).
    """
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    N = flat.numel()
    k = min(N, max(1, round(fraction * N)))
    cand = flat
    if N > 1_000_000 and k < N // 4:
        g = torch.Generator(device="cpu").manual_seed(seed)
        sample = flat[torch.randint(N, (1 << 20,), generator=g).to(flat.device)]
        q = 1.0 - min(0.5, 2.0 * k / N + 1e-3)
        low = torch.quantile(sample, q)
        above_low = flat[flat >= low]
        if above_low.numel() >= k:
            cand = above_low
    thr = cand.kthvalue(cand.numel() - k + 1).values  # the k-th largest
    del cand
    above = flat > thr
    need = k - int(above.sum())
    if need > 0:
        ties = (flat == thr).nonzero()[:need, 0]
        above[ties] = True
    del flat
    out, start = {}, 0
    for n in names:
        m = scores[n].numel()
        idx = above[start : start + m].nonzero()[:, 0]
        if idx.numel():
            out[n] = idx
        start += m
    return out, float(thr)
