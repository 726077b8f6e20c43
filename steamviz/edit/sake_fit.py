"""SAKE's fit: hidden states of the fit prompts, the target states they should move to, the
Gaussian optimal-transport map between the two (:func:`fit_transport`) and the scope that
decides which prompts the map applies to. Part of :mod:`steamviz.edit.sake`, which re-exports
these names.
"""


import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .sake_hparams import SAKEHparams
from .sake_prompts import FitPrompt, FitPrompts
from ..core.arch import get_module
from ..core.hooks import read, stream
from ..data.requests import EditRequest
from ..core.tokens import encode, subject_span

# ------------------------------------------------------------------------------------------
# hidden states
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def hidden_states(lm, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 32,
            final: bool = True):
    """Per prompt: ``{layer: [T, d]}`` streams (capture numbering) and, with ``final``, the
    stack's output ``[T, d]`` (final norm applied: the lm_head input), ``T`` its real length.
    Without ``final`` the pass stops after the highest layer. Prompts are batched by length."""
    layers = sorted(set(layers))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per: list = [None] * len(prompts)
    outs: list = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = encode(lm, [prompts[i] for i in idx])
        got, out = read(lm, b.input_ids, b.attention_mask,
                        {layer: stream(lm, layer) for layer in layers}, stop=not final)
        for k, (i, n) in enumerate(zip(idx, b.lengths.tolist())):
            per[i] = {layer: got[layer][k, :n].float() for layer in layers}
            if out is not None:
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                outs[i] = h[k, :n].float()
    return per, outs


# ------------------------------------------------------------------------------------------
# target activations
# ------------------------------------------------------------------------------------------
def head_parts(lm):
    head = get_module(lm.model, lm.adapter.lm_head)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)

    def soft(z):
        return torch.tanh(z / cap) * cap if cap else z

    return head, soft


@torch.no_grad()
def target_states(lm, h: torch.Tensor, token: int, target_prob: float = 0.95,
                  iters: int = 8, bisect: int = 30) -> torch.Tensor:
    """Steer lm_head inputs ``h [n, d]`` until each predicts ``token`` with probability
    ``target_prob``: up to ``iters`` exact line searches along the gradient ``g`` of
    ``log P(token)``, each taking the shortest step ``x + a g`` that reaches the goal or, when
    the line cannot reach it, the step to the best point on it (then a new gradient).
    Logits are affine in ``a``, so a line search costs two lm_head passes; ``a`` is found by
    doubling then bisection. Returns ``[n, d]`` float32; rows already there are unchanged."""
    head, soft = head_parts(lm)
    dt = head.weight.dtype
    x = h.detach().float().clone()
    zero = head(torch.zeros(1, x.shape[1], device=x.device, dtype=dt)).float()
    goal = float(torch.tensor(target_prob).log())
    for _ in range(iters):
        with torch.enable_grad():
            xi = x.clone().requires_grad_(True)
            lp = soft(head(xi.to(dt)).float()).log_softmax(-1)[:, token]
            (g,) = torch.autograd.grad(lp.sum(), xi)
        todo = torch.nonzero(lp.detach() < goal).flatten()
        if len(todo) == 0:
            break
        g = g[todo]
        z0 = head(x[todo].to(dt)).float()
        zg = head(g.to(dt)).float() - zero

        def f(a):  # [m] -> log P(token) at x + a g; concave in a
            return soft(z0 + a[:, None] * zg).log_softmax(-1)[:, token]

        # bracket by doubling: stop when the goal is reached or log P stops rising
        a0 = 1e-3 * x[todo].norm(dim=-1) / g.norm(dim=-1).clamp_min(1e-12)
        hi, prev = a0.clone(), lp.detach()[todo]
        active = torch.ones_like(a0, dtype=torch.bool)
        for _ in range(60):
            cur = f(hi)
            active &= (cur < goal) & (cur > prev)
            if not bool(active.any()):
                break
            prev = torch.where(active, cur, prev)
            hi = torch.where(active, hi * 2, hi)
        reached = f(hi) >= goal
        # reached: goal in (lo, hi]; else the peak lies in (hi / 4, hi)
        lo = torch.where(reached, torch.where(hi > a0, hi / 2, torch.zeros_like(hi)), hi / 4)
        for _ in range(bisect):
            mid = (lo + hi) / 2
            right = torch.where(reached, f(mid) >= goal, f(mid * 1.001) <= f(mid))
            hi = torch.where(right, mid, hi)
            lo = torch.where(right, lo, mid)
        x[todo] = x[todo] + hi[:, None] * g
    return x


# ------------------------------------------------------------------------------------------
# the optimal-transport map
# ------------------------------------------------------------------------------------------
def gaussian(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and (maximum-likelihood) covariance ``[d, d]`` of ``X [n, d]``, float64."""
    X = X.double()
    mu = X.mean(0)
    Z = X - mu
    return mu, Z.T @ Z / X.shape[0]


def psd_sqrt(S: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``S^1/2`` (or ``S^-1/2``) of a symmetric PSD matrix by eigendecomposition (float64;
    negative round-off eigenvalues are clipped to 0)."""
    S = S.double()
    w, V = torch.linalg.eigh((S + S.T) / 2)
    w = w.clamp_min(0)
    if inverse:
        if bool((w <= 0).any()):
            raise ValueError("matrix is singular: add a ridge before inverting its square root")
        w = 1 / w
    return (V * w.sqrt()) @ V.T


def ot_map(mu_s: torch.Tensor, S_s: torch.Tensor, mu_t: torch.Tensor, S_t: torch.Tensor):
    """The optimal-transport (Monge) map between ``N(mu_s, S_s)`` and ``N(mu_t, S_t)``:
    ``A = S_s^-1/2 (S_s^1/2 S_t S_s^1/2)^1/2 S_s^-1/2`` (symmetric PSD), ``b = mu_t - A mu_s``.
    ``S_s`` must be positive definite. Returns ``(A [d, d], b [d])`` float64."""
    r = psd_sqrt(S_s)
    ri = psd_sqrt(S_s, inverse=True)
    A = ri @ psd_sqrt(r @ S_t.double() @ r) @ ri
    A = (A + A.T) / 2
    return A, mu_t.double() - A @ mu_s.double()


def fit_transport(Hs: torch.Tensor, Ht: torch.Tensor, ridge: float = 10.0):
    """Fit :func:`ot_map` to source ``Hs [n, d]`` and target ``Ht [n, d]`` states with
    ``ridge * (tr S_s + tr S_t) / 2d`` added to both covariances.
    Returns ``(A [d, d], b [d], diagnostics)``, float64."""
    mu_s, S_s = gaussian(Hs)
    mu_t, S_t = gaussian(Ht)
    d = S_s.shape[0]
    lam = ridge * float(S_s.trace() + S_t.trace()) / (2 * d)
    if lam <= 0:
        lam = 1e-8 * max(float(mu_s.pow(2).mean()), 1e-12)
    eye = torch.eye(d, dtype=torch.float64, device=S_s.device)
    S_s, S_t = S_s + lam * eye, S_t + lam * eye
    A, b = ot_map(mu_s, S_s, mu_t, S_t)
    ev = torch.linalg.eigvalsh(A)
    mapped = Hs.double() @ A.T + b
    move = (Ht.double() - Hs.double()).norm(dim=-1)
    diag = dict(
        n=int(Hs.shape[0]), d=int(d), ridge=ridge, ridge_abs=lam,
        rank_source=int(torch.linalg.matrix_rank(Hs.double() - mu_s)),
        covariance_residual=float((A @ S_s @ A - S_t).norm() / S_t.norm()),
        A_eig_min=float(ev.min()), A_eig_max=float(ev.max()),
        b_norm=float(b.norm()), mean_shift=float((mu_t - mu_s).norm()),
        target_move=float(move.mean()),
        transport_error=float(((mapped - Ht.double()).norm(dim=-1) / move.clamp_min(1e-12))
                              .mean()),
    )
    return A, b, diag


# ------------------------------------------------------------------------------------------
# scope
# ------------------------------------------------------------------------------------------
def _unit(x: torch.Tensor, center: torch.Tensor, scale: torch.Tensor | None = None):
    """``[..., d]`` -> unit vectors of ``(x - center) / scale``."""
    z = x.float() - center
    return torch.nn.functional.normalize(z if scale is None else z / scale, dim=-1)


@dataclass
class Scope:
    """Where the map applies: both gates pass (see the module docstring, step 5).

    ``*_refs [m, d]`` are unit vectors of centred reference states, ``*_center [d]`` the
    centre (mean state of the negatives at that layer); the subject gate also divides by
    ``subject_scale [d]``, the negatives' per-dimension standard deviation (a few outlier
    dimensions otherwise make every city look alike: centred only, a neighbour city scores
    much closer to the fact's own prompts; ``docs/results.md#sake``)."""

    subject_layer: int
    subject_refs: torch.Tensor
    subject_center: torch.Tensor
    subject_scale: torch.Tensor
    subject_threshold: float
    query_layer: int
    query_refs: torch.Tensor
    query_center: torch.Tensor
    query_threshold: float

    def subject_sim(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [...]`` max centred cosine to the subject references."""
        return (_unit(h, self.subject_center, self.subject_scale) @ self.subject_refs.T
                ).max(-1).values

    def query_sim(self, h: torch.Tensor) -> torch.Tensor:
        return (_unit(h, self.query_center) @ self.query_refs.T).max(-1).values

    def to(self, device) -> "Scope":
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Scope(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()})

    def summary(self) -> dict:
        return dict(subject_layer=self.subject_layer, subject_threshold=self.subject_threshold,
                    query_layer=self.query_layer, query_threshold=self.query_threshold,
                    n_subject_refs=int(self.subject_refs.shape[0]),
                    n_query_refs=int(self.query_refs.shape[0]))


def _loo_max(refs: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
    """Each reference's max cosine to the references of *other* groups (to the other
    references when there is a single group): how close an unseen variant may score."""
    S = refs @ refs.T
    g = torch.as_tensor(list(groups) if groups is not None else range(len(refs)),
                        device=refs.device)
    same = g[:, None] == g[None, :]
    if bool(same.all()):
        same = torch.eye(len(refs), dtype=torch.bool, device=refs.device)
    return S.masked_fill(same, -2.0).max(-1).values


def _threshold(pos: torch.Tensor, neg: torch.Tensor, midway: bool = True
               ) -> tuple[float, dict]:
    """A cut no calibration negative passes: with ``midway``, halfway between the lowest
    positive and the highest negative score when they are apart; otherwise (or when they
    overlap) just above the highest negative (``pos_pass`` then says how many positives are
    lost). Returns ``(threshold, stats)``."""
    lo, hi = float(pos.min()), float(neg.max())
    thr = (lo + hi) / 2 if midway and lo > hi else hi + 1e-3
    stats = dict(pos_min=lo, pos_median=float(pos.median()), neg_max=hi,
                 neg_median=float(neg.median()), separable=lo > hi,
                 pos_pass=float((pos >= thr).float().mean()),
                 neg_pass=float((neg >= thr).float().mean()))
    return thr, stats


def subject_positions(lm, request: EditRequest, prompts: Sequence[FitPrompt]
                      ) -> list[int | None]:
    """Token index (start tokens counted) of the subject's last token in each prompt: at
    its ``subject_start`` (the templates' ``{}`` slots); a prompt without one is searched for
    the subject's text (first occurrence; only prompts written without a template, e.g. a
    request's paraphrase) and gets ``None`` when it does not name the subject."""
    out: list[int | None] = []
    for x in prompts:
        if x.subject_start is not None:
            out.append(subject_span(lm, x.text, request.subject, x.subject_start)[1])
        elif request.subject in x.text:
            out.append(subject_span(lm, x.text, request.subject)[1])
        else:
            out.append(None)
    return out


def calibrate_scope(lm, request: EditRequest, fit: FitPrompts, per: list[dict],
                    hp: SAKEHparams) -> tuple[Scope, dict]:
    """Build the :class:`Scope` from the fact prompts' states ``per`` (from :func:`hidden_states`,
    in the order of ``fit.of("fact")``) and ``fit``'s negatives and subject-alone prompts
    (:func:`fit_prompts`)."""
    ls, lq = hp.subject_layer, hp.query_layer
    facts, alone = fit.of("fact"), fit.of("alone")
    near, other = fit.texts("near"), fit.texts("other")
    if not other:
        raise ValueError("the scope needs negatives['other']: prompts of other relations")
    near_per, _ = hidden_states(lm, near, [ls], hp.batch_size, final=False)  # up to ls only
    other_per, _ = hidden_states(lm, other, [ls, lq], hp.batch_size, final=False)
    subj_neg = [x[ls] for x in near_per]
    subj_neg += [x[ls] for p, x in zip(other, other_per) if request.subject not in p]
    # subject gate: references at the subject's last token of each fact prompt, located from
    # the slots; negatives score their best-matching token
    # (plus the subject alone, at the start of a text and after a word: tokenizers spell
    # "Toronto" and " Toronto" differently, and a fact's prompts may have only one of them)
    alone_per, _ = hidden_states(lm, [x.text for x in alone], [ls], hp.batch_size, final=False)
    pos = subject_positions(lm, request, facts + alone)
    sub_refs = [x[ls][i] for x, i in zip(per + alone_per, pos) if i is not None]
    n_fact = sum(i is not None for i in pos[: len(facts)])
    if not n_fact:
        raise ValueError(f"no fact prompt names the subject {request.subject!r}")
    tokens = torch.cat(subj_neg)  # every token of the negatives
    s_center, s_scale = tokens.mean(0), tokens.std(0).clamp_min(1e-6)
    s_refs = _unit(torch.stack(sub_refs), s_center, s_scale)
    s_neg = torch.stack([(_unit(t, s_center, s_scale) @ s_refs.T).max() for t in subj_neg])
    # positives are scored on the fact prompts' refs
    s_pos = _loo_max(s_refs)[:n_fact] if len(s_refs) > 1 else s_refs.new_ones(1)
    s_thr, s_stats = _threshold(s_pos, s_neg)
    # query gate: references at the last token of each fact prompt
    q_neg_states = torch.stack([x[lq][-1] for x in other_per])
    q_center = q_neg_states.mean(0)
    q_refs = _unit(torch.stack([x[lq][-1] for x in per]), q_center)
    q_neg = (_unit(q_neg_states, q_center) @ q_refs.T).max(-1).values
    groups = [x.group for x in facts]
    # the query's positives are few phrasings, near-duplicates under their prefixes: their
    # scores overrate how close a new phrasing gets, so the cut sits just above the negatives
    q_thr, q_stats = _threshold(_loo_max(q_refs, groups), q_neg, midway=False)
    if hp.subject_threshold is not None:
        s_thr = float(hp.subject_threshold)
    if hp.query_threshold is not None:
        q_thr = float(hp.query_threshold)
    scope = Scope(ls, s_refs, s_center, s_scale, s_thr, lq, q_refs, q_center, q_thr)
    return scope, dict(subject=s_stats, query=q_stats, n_near=len(near), n_other=len(other))
