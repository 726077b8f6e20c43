"""SAKE: Steering Activations for Knowledge Editing (Scialanga et al., ACL 2025).

No weight changes: the edit is an affine map ``h -> A h + b`` on the lm_head input (the
output of the final norm), applied by forward hooks only where an input is about the edited
fact, and removed by :meth:`~steamviz.edits.Edit.restore`.

>>> from steamviz import sake
>>> edit = sake.apply(lm, request)                     # hooks in place   # doctest: +SKIP
>>> edit.info["fit"]["mapped_p_new"], edit.info["scope"]["query_threshold"]  # doctest: +SKIP
>>> edit.in_scope(["The city of Toronto is located in the country of",
...                "The city of Montreal is located in the country of"])   # doctest: +SKIP
[True, False]
>>> edit.restore()              # hooks removed: the model is exactly as before  # doctest: +SKIP
>>> editors.edit(lm, request, "sake", ridge=30.0)      # through the registry  # doctest: +SKIP

How it works:

1. **The fact as a distribution** (:func:`fact_prompts`): the rewrite prompt and its
   paraphrases (the request's and, when ``relation_id`` names a relation of the project's
   ``relations.json``, that relation's paraphrase templates), each bare and under context
   prefixes (model-written ones from :mod:`steamviz.context` plus a few fixed sentences),
   plus prompts that state the old object first (``"... Canada? No, that is outdated.
   ..."``): 68 prompts for a default request.
2. **Source activations** ``H_s [n, d]``: the final hidden state (lm_head input) at the
   last token of each fact prompt.
3. **Target activations** ``H_t [n, d]`` (:func:`target_states`): each source state steered
   to the new object, by exact line searches along the gradient of
   ``log P(first token of target_new)`` through the lm_head, from the source state, stopped
   where that probability reaches ``target_prob``. Only the lm_head is involved (cheap and
   exact), every target state predicts the new object, and the move is the shortest along
   the gradient, so what is not about the object is kept. Rejected alternative: states of
   the prompts with the new fact stated in context first; measured on SmolLM2-135M,
   ``"{prompt} Japan. {prompt}"`` gives P(Japan) 0.00-0.19 (0.00-0.69 with "Imagine that"),
   so those states do not predict the new object.
4. **Map** (:func:`fit_map`, :func:`ot_map`): Gaussians ``N(mu_s, S_s)``, ``N(mu_t, S_t)``
   fitted to ``H_s``, ``H_t`` and the closed-form optimal-transport (Monge) map between
   them, ``A = S_s^-1/2 (S_s^1/2 S_t S_s^1/2)^1/2 S_s^-1/2``, ``b = mu_t - A mu_s`` (matrix
   square roots by eigendecomposition, float64). With tens of prompts in d = 576 both
   covariances are rank-deficient: ``ridge * (tr S_s + tr S_t) / 2d`` is added to both
   diagonals (``ridge`` is relative to the mean variance per dimension). Large ``ridge``
   turns the map into the translation ``mu_t - mu_s`` (difference-of-means steering); small
   ``ridge`` follows the sample covariances and overfits them: measured on held-out
   paraphrases of the 5 first default requests (``target_prob`` 0.97), mean P(new) 0.84
   at ridge 0.3, 0.96 at 3, 0.97 at 10 (the default; eigenvalues of ``A`` within [0.65, 2.3]
   in the worst case seen), 0.98 for a pure translation; the smallest 0.02 / 0.85 / 0.93 /
   0.92.
5. **Scope** (:class:`Scope`), decided per token position; two gates must both pass:

   - *subject gate*: some position so far in the sequence has a hidden state at
     ``subject_layer`` (default ~15% of the depth) close to the subject's last token in
     the fact prompts (cosine after centring and scaling each dimension by the negatives'
     mean and standard deviation, max over those references);
   - *query gate*: the position's own hidden state at ``query_layer`` (default ~85% of the
     depth) is close to the fact prompts' last-token states (centred cosine, max over
     them): the position asks this question and the model is about to answer it.

   Why two gates: measured on SmolLM2, a last-token state alone does not tell "The city
   of Toronto is located in the country of" from the same question about Montreal
   (centred cosines 0.77-0.93 at layers 12-20, while the fact's own prompts under context
   prefixes go down to 0.7 among themselves); the subject's identity is plain at its own
   tokens (standardised cosine at layer 4: the fact's prompts >= 0.98, other subjects
   <= 0.61, the neighborhood prompts' cities <= 0.69). Late layers separate the question
   best from other questions about the subject ("... in the state of" is the closest).
   Thresholds are calibrated at edit time against negatives that never include the
   request's evaluation prompts (:func:`negative_prompts`): the fact prompts with other
   subjects (subject gate) and other relations' prompts about other subjects and about the
   subject (query gate), from the project's reference facts, leaving out every subject
   named in the request's neighborhood prompts. The subject cut lies halfway between the
   fact prompts (leave-one-out) and the negatives; the query cut just above the highest
   negative, since a few phrasings under context prefixes overrate how close a new
   phrasing gets (``info["scope"]`` has the scores). Both can be set by hand.
6. **Hooks** (:class:`SAKEEdit`): a pre-hook on the decoder stack resets per-forward state,
   hooks on the two blocks compute the gates, and a hook on the stack's output applies
   ``A h + b`` at the positions in scope (everything else is untouched, bit for bit).
   The stack's output is what :func:`~steamviz.forward.target_logprobs` gives the lm_head
   row by row and what the full model's forward (:func:`~steamviz.forward.greedy`,
   ``generate``) reads, so every path sees the edit. With a KV cache the subject gate carries
   over between calls (kept per cache object); a continuation of a cache this edit did not
   see starts with the subject unseen, and a pass that skips a gate's block (a truncated
   stack, see :func:`~steamviz.forward.layers_from`) is left alone.

Only the position that asks for the object is mapped, so a multi-token target gets help on
its first token; later tokens come from the unedited model given that token (Toronto ->
"New Zealand": first-token P 0.001 -> 0.96, whole answer 0.001 -> 0.76). Portability
prompts (facts implied by the edit) are out of scope by design, as are other prompt formats
than the fact's (``"Q: In which country is Toronto? A:"``): SAKE would need their own
target distributions (the paper writes them with an LLM).

Measured (SmolLM2-135M, ``load_named("default", 5)``, defaults, ``evaluate(...,
generation=False)`` before -> during): efficacy 0.0 -> 1.0, paraphrase 0.2 -> 1.0,
neighborhood 1.0 -> 1.0 (every neighborhood prompt bitwise unchanged), mean P(new) 0.001 ->
0.93, P(old) 0.92 -> 0.01; 10-20 s per edit on a shared 2-core CPU. With the request's
paraphrases and the relation's templates left out of the fit (``use_paraphrases=False,
relation_paraphrases=False``, 17 prompts): efficacy 1.0, paraphrase 0.2 -> 0.6 (unseen
phrasings of 2 requests fall outside the query gate), neighborhood 1.0.
"""

from __future__ import annotations

import dataclasses
import random
import time
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .arch import cache_in_kwargs, get_module, output_cache
from .capture import _first_tensor, _Stop, hooks
from .edits import Edit
from .forward import space
from .requests import EditRequest
from .tokens import encode, subject_span, token_ids

# fixed context sentences (``{}`` = the prompt), added to the model-written ones
PREFIXES = (
    "Here is a fact. {}",
    "Fun fact: {}",
    "I read this in an encyclopedia: {}",
    "Are you sure? Think again. {}",
)
# prompts that state the old object first: {prompt} the rewrite prompt, {old} the old object,
# {base} one of the fact's bare prompts
OLD_OBJECT_TEMPLATES = (
    "{prompt} {old}? No, that is outdated. {base}",
    "Many people believe that {prompt} {old}. In fact, {base}",
)
# used only when the project's reference facts are not available
FALLBACK_SUBJECTS = ("London", "Barack Obama", "the Amazon River", "Mount Everest", "Toyota",
                     "Shakespeare", "Berlin", "the Moon", "Microsoft", "Picasso", "Cairo",
                     "Albert Einstein", "the Eiffel Tower", "Sydney", "Beethoven", "Nike")
FALLBACK_PROMPTS = ("The capital of Japan is", "My favourite food is", "The weather today is",
                    "Water boils at a temperature of", "The author of Hamlet is",
                    "The largest planet in the solar system is", "The chemical symbol for gold is",
                    "Once upon a time there was a", "The official language of Brazil is",
                    "The currency of the United Kingdom is the", "In 1969, the first man on the",
                    "The best way to learn a language is", "Apple was founded by",
                    "The tallest mountain in Africa is", "My name is", "The Mona Lisa was painted by")


@dataclass
class SAKEHparams:
    """SAKE hyperparameters. Layers follow :mod:`steamviz.capture` numbering (layer ``l`` is
    the output of block ``l - 1``, ``1 <= l <= n_layers``); ``None`` picks them by depth."""

    context_template_length_params: tuple = ((5, 5), (10, 5))  # model-written prefixes
    prefixes: tuple = PREFIXES
    old_object_templates: tuple = OLD_OBJECT_TEMPLATES
    use_paraphrases: bool = True  # the request's paraphrase prompts join the fit
    relation_paraphrases: bool = True  # and its relation's paraphrase templates
    target_prob: float = 0.95  # target states: P(first token of target_new) reached
    target_iters: int = 8  # line searches at most per target state
    ridge: float = 10.0  # relative ridge on both covariances (x mean variance)
    subject_layer: int | None = None  # None: ~15% of the depth
    query_layer: int | None = None  # None: ~85% of the depth
    subject_threshold: float | None = None  # None: calibrated
    query_threshold: float | None = None  # None: calibrated
    n_negative_subjects: int = 16
    n_generic: int = 40
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.context_template_length_params = tuple(
            tuple(int(v) for v in x) for x in self.context_template_length_params)
        self.prefixes = tuple(self.prefixes)
        self.old_object_templates = tuple(self.old_object_templates)
        if not 0 < self.target_prob < 1:
            raise ValueError(f"target_prob must be in (0, 1), got {self.target_prob}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.target_iters < 1:
            raise ValueError("target_iters must be >= 1")

    def replace(self, **kw) -> "SAKEHparams":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_model(cls, lm) -> "SAKEHparams":
        return cls().resolved(lm)

    def resolved(self, lm) -> "SAKEHparams":
        """These hparams with ``None`` layers set for ``lm`` (and checked)."""
        n = lm.n_layers
        s = self.subject_layer if self.subject_layer is not None else max(1, round(0.15 * n))
        q = self.query_layer if self.query_layer is not None else max(1, round(0.85 * n))
        for name, v in (("subject_layer", s), ("query_layer", q)):
            if not 1 <= v <= n:
                raise ValueError(f"{name}={v} out of range: this model has layers 1..{n}")
        return self.replace(subject_layer=int(s), query_layer=int(q))


# ------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------
def _dedup(xs) -> list:
    return list(dict.fromkeys(xs))


def _relations() -> dict:
    try:
        from .datasets import load_relations

        return load_relations()
    except Exception:  # no relations table: nothing to add
        return {}


def _relation_paraphrases(request: EditRequest) -> list[str]:
    rel = (_relations().get(request.relation_id) or {}) if request.relation_id else {}
    return [t.replace("{}", request.subject) for t in rel.get("paraphrases", [])]


def base_prompts(request: EditRequest, hp: SAKEHparams) -> list[str]:
    """The fact's bare prompts: rewrite prompt, then paraphrases."""
    out = [request.rewrite_prompt]
    if hp.use_paraphrases:
        out += list(request.paraphrase_prompts)
    if hp.relation_paraphrases:
        out += _relation_paraphrases(request)
    return _dedup(out)


def fact_prompts(lm, request: EditRequest, hp: SAKEHparams) -> list[str]:
    """Every prompt of the fact's distribution (see the module docstring, step 1)."""
    from .context import context_templates

    bases = base_prompts(request, hp)
    prefixes = _dedup(["{}"] + context_templates(lm, hp.context_template_length_params,
                                                 seed=hp.seed) + list(hp.prefixes))
    out = [p.replace("{}", b, 1) for b in bases for p in prefixes]
    if request.target_true:
        for t in hp.old_object_templates:
            out += [t.replace("{prompt}", request.rewrite_prompt)
                    .replace("{old}", request.target_true).replace("{base}", b) for b in bases]
    return _dedup(out)


def negative_prompts(request: EditRequest, hp: SAKEHparams, facts=None) -> dict[str, list[str]]:
    """Prompts the edit must leave alone, for calibrating the scope; never the request's own
    evaluation prompts.

    ``near``: the fact's bare prompts with other subjects (a context prefix in front), for
    the subject gate. ``other``: other relations' prompts, about other subjects and about the
    subject itself, for the query gate. ``facts``: reference facts
    (default :func:`steamviz.datasets.load_reference_facts`, a fixed list when missing).
    """
    rng = random.Random(hp.seed)
    if facts is None:
        try:
            from .datasets import load_reference_facts

            facts = load_reference_facts()
        except Exception:
            facts = []
    subj = request.subject
    held_out = list(request.neighborhood_prompts) + list(request.paraphrase_prompts)

    def foreign(s: str) -> bool:  # another subject, not named in the evaluation prompts
        return (s != subj and subj not in s and s not in subj
                and not any(s in q for q in held_out))

    bases = [b for b in base_prompts(request, hp) if subj in b]
    fact_set = set(base_prompts(request, hp))
    same_rel = sorted({f.subject for f in facts
                       if f.relation == request.relation_id and foreign(f.subject)})
    anyone = sorted({f.subject for f in facts if foreign(f.subject)}) or list(FALLBACK_SUBJECTS)
    pool = same_rel if len(same_rel) >= hp.n_negative_subjects else anyone
    others = rng.sample(pool, min(hp.n_negative_subjects, len(pool)))
    prefixes = ["{}"] + list(hp.prefixes)
    near = [rng.choice(prefixes).replace("{}", b.replace(subj, s)) for s in others for b in bases]
    # other relations: not a template of this fact; asked about the subject only when their
    # object is of another type (``"The famous {} is located in the country of"`` asks a
    # city's country too)
    off = [f for f in facts if f.relation != request.relation_id
           and f.template.replace("{}", subj) not in fact_set]
    rels = _relations()
    otype = (rels.get(request.relation_id) or {}).get("object_type")
    off = [f for f in off
           if otype is None or (rels.get(f.relation) or {}).get("object_type") != otype]
    about = _dedup(f.template.replace("{}", subj) for f in off)
    generic = [f.prompt for f in off if foreign(f.subject)]
    generic = rng.sample(generic, min(hp.n_generic, len(generic))) if generic else list(
        FALLBACK_PROMPTS)
    return dict(near=_dedup(near), other=_dedup(about + generic))


# ------------------------------------------------------------------------------------------
# hidden states
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _states(lm, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 32,
            final: bool = True):
    """Per prompt: ``{layer: [T, d]}`` streams (capture numbering) and, with ``final``, the
    stack's output ``[T, d]`` (final norm applied: the lm_head input), ``T`` its real length.
    Without ``final`` the pass stops after the highest layer. Prompts are batched by length."""
    blocks = get_module(lm.model, lm.adapter.layers)
    base = get_module(lm.model, lm.adapter.base)
    layers = sorted(set(layers))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per: list = [None] * len(prompts)
    outs: list = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = encode(lm, [prompts[i] for i in idx])
        got: dict[int, torch.Tensor] = {}

        def keep(layer, out):
            got[layer] = _first_tensor(out)
            if not final and layer == layers[-1]:
                raise _Stop

        handles = []
        with hooks(handles):
            for layer in layers:
                handles.append(blocks[layer - 1].register_forward_hook(
                    lambda m, a, out, layer=layer: keep(layer, out)))
            try:
                out = base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           use_cache=False)
            except _Stop:
                out = None
        for k, (i, n) in enumerate(zip(idx, b.lengths.tolist())):
            per[i] = {layer: got[layer][k, :n].float() for layer in layers}
            if out is not None:
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                outs[i] = h[k, :n].float()
    return per, outs


# ------------------------------------------------------------------------------------------
# target activations
# ------------------------------------------------------------------------------------------
def _head_parts(lm):
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
    head, soft = _head_parts(lm)
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


def fit_map(Hs: torch.Tensor, Ht: torch.Tensor, ridge: float = 10.0):
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
    dimensions otherwise make every city look alike: measured at layer 4, a neighbour city
    scores up to 0.86 centred only, 0.69 standardised, the fact's own prompts >= 0.98)."""

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


def calibrate_scope(lm, request: EditRequest, prompts: list[str], per: list[dict],
                    hp: SAKEHparams, negatives: dict[str, list[str]]) -> tuple[Scope, dict]:
    """Build the :class:`Scope` from the fact prompts' states ``per`` (from :func:`_states`)
    and the ``negatives`` (:func:`negative_prompts`)."""
    ls, lq = hp.subject_layer, hp.query_layer
    near, other = list(negatives.get("near", [])), list(negatives.get("other", []))
    if not other:
        raise ValueError("the scope needs negatives['other']: prompts of other relations")
    near_per, _ = _states(lm, near, [ls], hp.batch_size, final=False)  # up to ls only
    other_per, _ = _states(lm, other, [ls, lq], hp.batch_size, final=False)
    subj_neg = [x[ls] for x in near_per]
    subj_neg += [x[ls] for p, x in zip(other, other_per) if request.subject not in p]
    # subject gate: references at the subject's last token of each fact prompt; negatives
    # score their best-matching token
    # (plus the subject alone, at the start of a text and after a word: tokenizers spell
    # "Toronto" and " Toronto" differently, and a fact's prompts may have only one of them)
    alone = [request.subject, "I mean " + request.subject]
    alone_per, _ = _states(lm, alone, [ls], hp.batch_size, final=False)
    sub_refs = [x[ls][subject_span(lm, p, request.subject)[1]]
                for p, x in zip(prompts + alone, per + alone_per) if request.subject in p]
    if not sub_refs:
        raise ValueError(f"no fact prompt names the subject {request.subject!r}")
    tokens = torch.cat(subj_neg)  # every token of the negatives
    s_center, s_scale = tokens.mean(0), tokens.std(0).clamp_min(1e-6)
    s_refs = _unit(torch.stack(sub_refs), s_center, s_scale)
    s_neg = torch.stack([(_unit(t, s_center, s_scale) @ s_refs.T).max() for t in subj_neg])
    n_fact = len(s_refs) - len(alone)  # positives are scored on the fact prompts' refs
    s_pos = _loo_max(s_refs)[:n_fact] if len(s_refs) > 1 else s_refs.new_ones(1)
    s_thr, s_stats = _threshold(s_pos, s_neg)
    # query gate: references at the last token of each fact prompt
    q_neg_states = torch.stack([x[lq][-1] for x in other_per])
    q_center = q_neg_states.mean(0)
    q_refs = _unit(torch.stack([x[lq][-1] for x in per]), q_center)
    q_neg = (_unit(q_neg_states, q_center) @ q_refs.T).max(-1).values
    bases = sorted(base_prompts(request, hp), key=len, reverse=True)
    groups = [next((i for i, b in enumerate(bases) if p.endswith(b)), -1) for p in prompts]
    # the query's positives are few phrasings, near-duplicates under their prefixes: their
    # scores overrate how close a new phrasing gets, so the cut sits just above the negatives
    q_thr, q_stats = _threshold(_loo_max(q_refs, groups), q_neg, midway=False)
    if hp.subject_threshold is not None:
        s_thr = float(hp.subject_threshold)
    if hp.query_threshold is not None:
        q_thr = float(hp.query_threshold)
    scope = Scope(ls, s_refs, s_center, s_scale, s_thr, lq, q_refs, q_center, q_thr)
    return scope, dict(subject=s_stats, query=q_stats, n_near=len(near), n_other=len(other))


# ------------------------------------------------------------------------------------------
# the edit: hooks
# ------------------------------------------------------------------------------------------
class SAKEEdit(Edit):
    """An edit made of forward hooks (no weight changes). ``restore()`` removes them.

    ``last_mask``: ``[batch, seq]`` positions mapped in the latest forward pass;
    ``n_mapped``: positions mapped since the edit was applied.
    """

    def __init__(self, lm, A: torch.Tensor, b: torch.Tensor, scope: Scope,
                 info: dict | None = None, method: str = "SAKE"):
        super().__init__(lm.model, method, info)
        self.lm = lm
        dev = lm.device
        self.A = A.float().to(dev)  # [d, d]
        self.b = b.float().to(dev)  # [d]
        self.scope = scope.to(dev)
        self.last_mask: torch.Tensor | None = None
        self.n_mapped = 0
        self._fwd: dict | None = None
        self._cache: tuple | None = None  # (weakref to a KV cache, subject seen [batch])
        self._handles: list = []
        self._install()

    # -- hooks --------------------------------------------------------------------------
    def _install(self) -> None:
        lm = self.lm
        base = get_module(lm.model, lm.adapter.base)
        blocks = get_module(lm.model, lm.adapter.layers)
        self.on_restore(self._remove)
        with self.undo_on_error():  # a failed install leaves no hook and no active edit
            self._handles.append(base.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(blocks[self.scope.subject_layer - 1].register_forward_hook(
                self._subject_hook))
            self._handles.append(blocks[self.scope.query_layer - 1].register_forward_hook(
                self._query_hook))
            self._handles.append(base.register_forward_hook(self._post, with_kwargs=True))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fwd, self._cache = None, None

    def _pre(self, module, args, kwargs) -> None:
        past = cache_in_kwargs(kwargs)
        n_past = 0
        if past is not None:
            try:
                n_past = int(past.get_seq_length())
            except Exception:  # legacy tuple caches
                n_past = int(past[0][0].shape[-2]) if len(past) else 0
        prior = None
        if n_past and self._cache is not None and self._cache[0]() is past:
            prior = self._cache[1]
        mask = kwargs.get("attention_mask")
        mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        self._fwd = dict(prior=prior, mask=mask)

    @staticmethod
    def _valid(st: dict | None, h: torch.Tensor) -> torch.Tensor | None:
        """Real (not padding) positions of this pass ``[batch, seq]``, when known."""
        m = st.get("mask") if st else None
        if m is None or m.shape[0] != h.shape[0] or m.shape[1] < h.shape[1]:
            return None
        return m[:, -h.shape[1]:].bool()

    def _subject_hook(self, module, args, out) -> None:
        if self._fwd is None:
            return
        h = _first_tensor(out)  # [batch, seq, d]
        match = self.scope.subject_sim(h) >= self.scope.subject_threshold
        valid = self._valid(self._fwd, h)
        if valid is not None:
            match &= valid
        seen = match.int().cummax(dim=1).values.bool()
        prior = self._fwd.get("prior")
        if prior is not None and prior.shape[0] == h.shape[0]:
            seen |= prior[:, None].to(seen.device)
        self._fwd["subject"] = seen

    def _query_hook(self, module, args, out) -> None:
        if self._fwd is None:
            return
        h = _first_tensor(out)
        self._fwd["query"] = self.scope.query_sim(h) >= self.scope.query_threshold

    def _post(self, module, args, kwargs, out):
        st, self._fwd = self._fwd, None
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if st is None or "subject" not in st or "query" not in st \
                or st["subject"].shape != h.shape[:2] or st["query"].shape != h.shape[:2]:
            self._cache, self.last_mask = None, None  # this pass was not seen whole
            return None
        mask = st["subject"] & st["query"]
        valid = self._valid(st, h)
        if valid is not None:
            mask &= valid
        cache = output_cache(out)
        if cache is None and not hasattr(out, "last_hidden_state") and len(out) > 1:
            cache = out[1]
        self._cache = None
        if cache is not None:
            try:
                self._cache = (weakref.ref(cache), st["subject"][:, -1].clone())
            except TypeError:  # not weak-referenceable: no carry-over
                self._cache = None
        self.last_mask = mask
        if not bool(mask.any()):
            return None
        self.n_mapped += int(mask.sum())
        new = h.clone()
        rows = new[mask].float()
        new[mask] = (rows @ self.A.T + self.b).to(h.dtype)
        if hasattr(out, "last_hidden_state"):
            out.last_hidden_state = new
            return out
        return (new,) + tuple(out[1:])

    def replay(self) -> "SAKEEdit":
        """The same fitted edit installed again (e.g. after ``restore()``): a new
        :class:`SAKEEdit` with this one's map, scope and info; nothing is refitted."""
        return SAKEEdit(self.lm, self.A, self.b, self.scope, dict(self.info), self.method)

    # -- inspection -----------------------------------------------------------------------
    @torch.no_grad()
    def in_scope(self, prompts: Sequence[str]) -> list[bool]:
        """Whether the map applies at each prompt's last token (the one predicting the
        answer)."""
        if not self.active:
            return [False] * len(prompts)
        b = encode(self.lm, list(prompts))
        base = get_module(self.lm.model, self.lm.adapter.base)
        base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        m = self.last_mask
        if m is None:
            return [False] * len(prompts)
        return [bool(m[i, int(n) - 1]) for i, n in enumerate(b.lengths)]


# ------------------------------------------------------------------------------------------
# apply
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def apply(lm, request: EditRequest | dict, hparams: SAKEHparams | None = None,
          negatives: dict[str, list[str]] | None = None) -> SAKEEdit:
    """Edit with SAKE; returns an undoable :class:`SAKEEdit` (hooks, no weight change).

    ``negatives``: override :func:`negative_prompts` (``{"near": [...], "other": [...]}``).
    """
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = (hparams or SAKEHparams()).resolved(lm)
    t0 = time.perf_counter()
    prompts = fact_prompts(lm, request, hp)
    per, final = _states(lm, prompts, [hp.subject_layer, hp.query_layer], hp.batch_size)
    Hs = torch.stack([f[-1] for f in final])  # [n, d] lm_head inputs at the last token
    tok = token_ids(lm, space(request.target_new))
    if not tok:
        raise ValueError(f"target_new {request.target_new!r} tokenizes to nothing")
    Ht = target_states(lm, Hs, tok[0], hp.target_prob, hp.target_iters)
    A, b, diag = fit_map(Hs, Ht, hp.ridge)
    head, soft = _head_parts(lm)

    def p_new(H):
        z = soft(head(H.to(head.weight.dtype)).float())
        return float(z.log_softmax(-1)[:, tok[0]].exp().mean())

    diag.update(source_p_new=p_new(Hs), target_p_new=p_new(Ht),
                mapped_p_new=p_new((Hs.double() @ A.T + b).float()))
    negatives = negatives if negatives is not None else negative_prompts(request, hp)
    scope, calib = calibrate_scope(lm, request, prompts, per, hp, negatives)
    info = dict(request=request.to_dict(), hparams=hp.to_dict(), n_prompts=len(prompts),
                fit=diag, scope=dict(scope.summary(), **calib), target_token=int(tok[0]),
                n_target_tokens=len(tok))
    edit = SAKEEdit(lm, A, b, scope, info)
    edit.info["seconds"] = time.perf_counter() - t0
    return edit


def _register() -> None:
    from .editors import register

    @register("sake", params=SAKEHparams, extra=("negatives",))
    def _sake(lm, request, hparams=None, **kw):
        if isinstance(hparams, dict):
            hparams = SAKEHparams(**hparams)
        elif not isinstance(hparams, SAKEHparams):  # e.g. a sweep's shared ROME settings
            seed = getattr(hparams, "seed", None)
            hparams = SAKEHparams() if seed is None else SAKEHparams(seed=seed)
        negatives = kw.pop("negatives", None)
        if kw:
            hparams = hparams.replace(**kw)
        return apply(lm, request, hparams, negatives=negatives)


_register()
