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

0. **Held out** (:func:`fit_prompts`, the one place the fit's prompts come from; issue
   18.1): the fit never reads a prompt evaluation reads (:func:`evaluation_prompts`: the
   request's paraphrase, neighborhood, portability and generation prompts), neither the same
   text nor the same question behind another preamble (:class:`HeldOut`; normalised text).
   The rewrite prompt is the request and is used. So the paraphrase score is out-of-sample.
1. **The fact as a distribution** (:func:`fact_prompts`): the rewrite prompt and, when
   ``relation_id`` names a relation of the project's ``relations.json``, that relation's
   paraphrase templates filled with the subject (those that are not evaluation prompts: on
   the default edit set most paraphrase prompts *are* such templates, which are then left
   out; counts in ``docs/results.md#sake``), each bare and under context prefixes
   (model-written ones from :mod:`steamviz.context` plus a few fixed sentences), plus
   prompts that state the old object first (``"... Canada? No, that is outdated. ..."``):
   a few dozen prompts per request. The subject is located from the templates' ``{}``
   slots (in an old-object prompt, the question's), never by searching its text, so a
   context prefix that names the subject does not move the subject gate's reference; only
   the request's own paraphrases (no template; fitted on only with ``use_paraphrases``)
   are searched.
2. **Source activations** ``H_s [n, d]``: the final hidden state (lm_head input) at the
   last token of each fact prompt.
3. **Target activations** ``H_t [n, d]`` (:func:`target_states`): each source state steered
   to the new object, by exact line searches along the gradient of
   ``log P(first token of target_new)`` through the lm_head, from the source state, stopped
   where that probability reaches ``target_prob``. Only the lm_head is involved (cheap and
   exact), every target state predicts the new object, and the move is the shortest along
   the gradient, so what is not about the object is kept. Rejected alternative: states of
   the prompts with the new fact stated in context first (``"{prompt} Japan. {prompt}"``,
   also after "Imagine that"): on SmolLM2-135M those states mostly do not predict the new
   object (``docs/results.md#sake``).
4. **Map** (:func:`fit_map`, :func:`ot_map`): Gaussians ``N(mu_s, S_s)``, ``N(mu_t, S_t)``
   fitted to ``H_s``, ``H_t`` and the closed-form optimal-transport (Monge) map between
   them, ``A = S_s^-1/2 (S_s^1/2 S_t S_s^1/2)^1/2 S_s^-1/2``, ``b = mu_t - A mu_s`` (matrix
   square roots by eigendecomposition, float64). With tens of prompts in d = 576 both
   covariances are rank-deficient: ``ridge * (tr S_s + tr S_t) / 2d`` is added to both
   diagonals (``ridge`` is relative to the mean variance per dimension). Large ``ridge``
   turns the map into the translation ``mu_t - mu_s`` (difference-of-means steering); small
   ``ridge`` follows the sample covariances and overfits them (held-out paraphrases lose
   the new object). The default, 10, does about as well on held-out paraphrases as a pure
   translation, with the eigenvalues of ``A`` kept moderate (the ridge sweep:
   ``docs/results.md#sake``).
5. **Scope** (:class:`Scope`), decided per token position; two gates must both pass:

   - *subject gate*: some position so far in the sequence has a hidden state at
     ``subject_layer`` (default ~15% of the depth) close to the subject's last token in
     the fact prompts (cosine after centring and scaling each dimension by the negatives'
     mean and standard deviation, max over those references);
   - *query gate*: the position's own hidden state at ``query_layer`` (default ~85% of the
     depth) is close to the fact prompts' last-token states (centred cosine, max over
     them): the position asks this question and the model is about to answer it.

   Why two gates: on SmolLM2, a last-token state alone does not tell "The city of
   Toronto is located in the country of" from the same question about Montreal (the two
   are as close as the fact's own prompts under different context prefixes are to each
   other), while the subject's identity is plain at its own tokens in an early layer
   (the cosines: ``docs/results.md#sake``). Late layers separate the question best from
   other questions about the subject ("... in the state of" is the closest).
   Thresholds are calibrated at edit time against negatives that never include the
   request's evaluation prompts (:func:`negative_prompts`): the fact prompts with other
   subjects (subject gate) and other relations' prompts about other subjects and about the
   subject (query gate), from the project's reference facts, leaving out every subject
   named in an evaluation prompt and every evaluation prompt (e.g. a portability prompt
   that is another relation's template filled with the subject). The subject cut lies
   halfway between the fact prompts (leave-one-out) and the negatives; the query cut just
   above the highest negative, since a few phrasings under context prefixes overrate how
   close a new phrasing gets (``info["scope"]`` has the scores). Both can be set by hand.
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
"New Zealand": the first token becomes likely, the whole answer less so;
``docs/results.md#sake``). Portability prompts (facts implied by the edit) are out of scope
by design, as are other prompt formats than the fact's (``"Q: In which country is
Toronto? A:"``): SAKE would need their own target distributions (the paper writes them
with an LLM).

Scores on the default edit set (efficacy, held-out paraphrase, neighborhood, P(new) and
P(old)) and the commands that made them: ``docs/results.md#sake``. A paraphrase phrased
unlike every fit prompt can fall outside the query gate; prompts outside the scope, such as
the neighborhood prompts, are left bitwise unchanged. Before issue 18.1 the fit read the
evaluation paraphrases (the request's own and the relation templates that coincide with
them), so its paraphrase score was in-sample (``use_paraphrases=True`` reads the request's
paraphrases again).
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .arch import cache_in_kwargs, get_module, output_cache
from .hooks import first_tensor, read, stream
from .edits import Edit
from .forward import space
from .hparams import Hparams
from .requests import EditRequest
from .tokens import encode, fill, subject_span, token_ids

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
class SAKEHparams(Hparams):
    """SAKE hyperparameters. Layers follow :mod:`steamviz.capture` numbering (layer ``l`` is
    the output of block ``l - 1``, ``1 <= l <= n_layers``); ``None`` picks them by depth."""

    context_template_length_params: tuple = ((5, 5), (10, 5))  # model-written prefixes
    prefixes: tuple = PREFIXES
    old_object_templates: tuple = OLD_OBJECT_TEMPLATES
    # True: the request's paraphrase prompts join the fit, so the paraphrase score is
    # in-sample (how steamviz fitted SAKE before issue 18.1); keep False to report it
    use_paraphrases: bool = False
    # the relation's paraphrase templates (relations.json) filled with the subject join the
    # fit, except those evaluation reads (a paraphrase, neighborhood, portability prompt...)
    relation_paraphrases: bool = True
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
        for p in self.prefixes:
            if p.count("{}") != 1:
                raise ValueError(f"prefix {p!r} must hold exactly one '{{}}' for the prompt")
        if not 0 < self.target_prob < 1:
            raise ValueError(f"target_prob must be in (0, 1), got {self.target_prob}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.target_iters < 1:
            raise ValueError("target_iters must be >= 1")

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
# prompts: what the fit reads, and the evaluation prompts it must never read
# ------------------------------------------------------------------------------------------
def _dedup(xs) -> list:
    return list(dict.fromkeys(xs))


def normalise(text: str) -> str:
    """How prompts are compared: stripped, whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def _ends_with(a: str, b: str) -> bool:
    """``a`` ends with ``b`` at a word boundary (both normalised)."""
    return a.endswith(b) and (len(a) == len(b) or not a[-len(b) - 1].isalnum())


def evaluation_prompts(request: EditRequest, exclude: Sequence[str] = ()) -> list[str]:
    """Every prompt :func:`steamviz.metrics.evaluate` reads for ``request`` but its rewrite
    prompt: paraphrase, neighborhood and portability prompts, generation prompts (rewrite and
    paraphrases; the request's own ``generation_prompts`` when it has them), plus ``exclude``
    (e.g. the evaluation prompts of other requests evaluated with this edit in place).

    The rewrite prompt is the edit itself (efficacy reads it, SAKE fits on it); an evaluation
    prompt with the rewrite prompt's text is left out for the same reason."""
    from .metrics import generation_prompts

    out = (list(request.paraphrase_prompts) + list(request.neighborhood_prompts)
           + list(request.portability_prompts) + list(generation_prompts(request))
           + list(getattr(request, "generation_prompts", None) or []) + list(exclude))
    rewrite = normalise(request.rewrite_prompt)
    return _dedup(p for p in out if normalise(p) != rewrite)


class HeldOut:
    """The evaluation prompts SAKE's fit must not read (:func:`evaluation_prompts`).

    A fit prompt reads an evaluation prompt when, normalised (:func:`normalise`), its text
    equals it, or its *question* (the bare prompt it ends with, before a context prefix was
    put in front) equals it or one of the two ends with the other at a word boundary: the
    same question behind another preamble (SAKE puts context prefixes in front of its
    prompts; CounterFact's paraphrases have a preamble sentence). A question that is the
    rewrite prompt is the request itself and always allowed (even when an evaluation prompt
    is its tail, as ``"Toronto is located in the country of"`` is of ``"The city of Toronto
    is located in the country of"``). ``keep``: evaluation prompts the fit may read anyway
    (``use_paraphrases``).
    """

    def __init__(self, request: EditRequest, exclude: Sequence[str] = (),
                 keep: Sequence[str] = ()):
        self.rewrite = normalise(request.rewrite_prompt)
        self._keep = {normalise(k) for k in keep}
        self.prompts = [p for p in evaluation_prompts(request, exclude)
                        if normalise(p) not in self._keep]
        self._norm = [normalise(p) for p in self.prompts]
        self._set = set(self._norm)

    def reads(self, text: str, question: str | None = None) -> str | None:
        """The evaluation prompt a fit prompt ``text`` asking ``question`` (default: ``text``
        itself) reads, or ``None``."""
        t = normalise(text)
        if t in self._set:
            return self.prompts[self._norm.index(t)]
        q = normalise(text if question is None else question)
        if q == self.rewrite or q in self._keep:
            return None
        for p, e in zip(self.prompts, self._norm):
            if _ends_with(e, q) or _ends_with(q, e):
                return p
        return None


@dataclass(frozen=True)
class FitPrompt:
    """One prompt SAKE's fit reads.

    ``role``: ``"fact"`` (the fact's distribution: the map's source states and both gates'
    references), ``"near"`` / ``"other"`` (negatives calibrating the subject / query gate),
    ``"alone"`` (the subject on its own, extra subject-gate references). ``question``: the
    bare prompt ``text`` ends with (``text`` without its context prefix); ``group``: a fact
    prompt's question, as an index into the fact's questions. ``subject_start``: the
    request subject's character offset in ``text``, from the templates' ``{}`` slots;
    ``None`` when the prompt is not about the subject or was written without a template
    (a request's paraphrase prompt: then the subject's text is searched for).
    """

    text: str
    role: str
    question: str
    subject_start: int | None = None
    group: int = -1


@dataclass
class FitPrompts:
    """Every prompt SAKE's fit reads (:func:`fit_prompts`), and what was left out."""

    prompts: list[FitPrompt]
    held_out: HeldOut
    dropped: list[tuple[str, str]]  # (a prompt left out, the evaluation prompt it reads)

    def of(self, role: str) -> list[FitPrompt]:
        return [p for p in self.prompts if p.role == role]

    def texts(self, role: str | None = None) -> list[str]:
        return [p.text for p in self.prompts if role is None or p.role == role]


def _relations() -> dict:
    try:
        from .datasets import load_relations

        return load_relations()
    except Exception:  # no relations table: nothing to add
        return {}


def _relation_templates(request: EditRequest) -> list[str]:
    rel = (_relations().get(request.relation_id) or {}) if request.relation_id else {}
    return list(rel.get("paraphrases", []))


def _relation_paraphrases(request: EditRequest) -> list[str]:
    """The relation's paraphrase templates filled with the subject (unfiltered)."""
    return [fill(t, request.subject)[0] for t in _relation_templates(request)]


# a bare prompt of the fact: (text, template or None, subject offset or None)
_Base = tuple


def _bases(request: EditRequest, hp: SAKEHparams, held: HeldOut | None
           ) -> tuple[list[_Base], list[_Base], list[tuple[str, str]]]:
    """``(kept, every candidate, dropped)`` bare prompts of the fact: the rewrite prompt,
    the relation's paraphrase templates filled with the subject, and (``use_paraphrases``)
    the request's paraphrase prompts; ``held`` leaves out those evaluation reads."""
    templates = [request.prompt] + (_relation_templates(request) if hp.relation_paraphrases
                                    else [])
    cands: list[_Base] = [(text, t, at) for t in templates
                          for text, at in [fill(t, request.subject)]]
    if hp.use_paraphrases:  # written without a template: the subject will be searched for
        cands += [(p, None, None) for p in request.paraphrase_prompts]
    seen, every = set(), []
    for b in cands:
        if b[0] not in seen:
            seen.add(b[0])
            every.append(b)
    kept, dropped = [], []
    for b in every:
        hit = held.reads(b[0]) if held is not None else None
        if hit is None:
            kept.append(b)
        else:
            dropped.append((b[0], hit))
    return kept, every, dropped


def base_prompts(request: EditRequest, hp: SAKEHparams, exclude: Sequence[str] = ()
                 ) -> list[str]:
    """The fact's bare prompts the fit uses: the rewrite prompt, then the relation's
    paraphrase templates filled with the subject (and, with ``use_paraphrases``, the
    request's paraphrase prompts), leaving out every one that evaluation reads
    (:class:`HeldOut`)."""
    return [b[0] for b in _bases(request, hp, _held_out(request, hp, exclude))[0]]


def _held_out(request: EditRequest, hp: SAKEHparams, exclude: Sequence[str] = ()) -> HeldOut:
    return HeldOut(request, exclude,
                   keep=request.paraphrase_prompts if hp.use_paraphrases else ())


_FIELDS = re.compile(r"\{(prompt|old|base)\}")


def _fill_fields(template: str, **values: str) -> tuple[str, dict[str, int]]:
    """``template`` with ``{prompt}``, ``{old}``, ``{base}`` filled in one pass, and the
    character offset of each field in the result (its last occurrence)."""
    parts, starts, n, pos = [], {}, 0, 0
    for m in _FIELDS.finditer(template):
        parts.append(template[pos : m.start()])
        n += m.start() - pos
        v = values[m.group(1)]
        starts[m.group(1)] = n
        parts.append(v)
        n += len(v)
        pos = m.end()
    parts.append(template[pos:])
    return "".join(parts), starts


def _fact_items(request: EditRequest, hp: SAKEHparams, prefixes: Sequence[str],
                bases: list[_Base]) -> list[FitPrompt]:
    """Each bare prompt under each context prefix, then the old-object prompts; the subject
    located at the bare prompt's slot (in an old-object prompt: the question's, not the
    rewrite prompt's before it)."""
    out = []
    for g, (b, _, at) in enumerate(bases):
        for p in prefixes:
            text, j = fill(p, b)
            out.append(FitPrompt(text, "fact", b, None if at is None else j + at, g))
    if request.target_true:
        rewrite, rw_at = fill(request.prompt, request.subject)
        for t in hp.old_object_templates:
            for g, (b, _, at) in enumerate(bases):
                text, pos = _fill_fields(t, prompt=rewrite, old=request.target_true, base=b)
                if "base" in pos:
                    start = None if at is None else pos["base"] + at
                else:
                    start = pos["prompt"] + rw_at if "prompt" in pos else None
                out.append(FitPrompt(text, "fact", b, start, g))
    seen, uniq = set(), []
    for x in out:
        if x.text not in seen:
            seen.add(x.text)
            uniq.append(x)
    return uniq


def _negative_items(request: EditRequest, hp: SAKEHparams, facts, held: HeldOut,
                    bases: list[_Base], every: list[_Base]) -> list[FitPrompt]:
    """The calibration negatives (see :func:`negative_prompts`), unfiltered."""
    rng = random.Random(hp.seed)
    if facts is None:
        try:
            from .datasets import load_reference_facts

            facts = load_reference_facts()
        except Exception:
            facts = []
    subj = request.subject

    def foreign(s: str) -> bool:  # another subject, not named in the evaluation prompts
        return (s != subj and subj not in s and s not in subj
                and not any(s in q for q in held.prompts))

    own = {b[0] for b in every}  # the fact's own phrasings, kept or not
    same_rel = sorted({f.subject for f in facts
                       if f.relation == request.relation_id and foreign(f.subject)})
    anyone = sorted({f.subject for f in facts if foreign(f.subject)}) or list(FALLBACK_SUBJECTS)
    pool = same_rel if len(same_rel) >= hp.n_negative_subjects else anyone
    others = rng.sample(pool, min(hp.n_negative_subjects, len(pool)))
    prefixes = ["{}"] + list(hp.prefixes)
    near = []
    for s in others:
        for b, tpl, _ in bases:
            if tpl is not None:
                q = fill(tpl, s)[0]
            elif subj in b:  # a prompt written without a template: its subject replaced
                q = b.replace(subj, s)
            else:
                continue
            near.append(FitPrompt(fill(rng.choice(prefixes), q)[0], "near", q))
    # other relations: not a phrasing of this fact; asked about the subject only when their
    # object is of another type (``"The famous {} is located in the country of"`` asks a
    # city's country too)
    off = [f for f in facts if f.relation != request.relation_id
           and fill(f.template, subj)[0] not in own]
    rels = _relations()
    otype = (rels.get(request.relation_id) or {}).get("object_type")
    off = [f for f in off
           if otype is None or (rels.get(f.relation) or {}).get("object_type") != otype]
    about = {}
    for f in off:
        text, at = fill(f.template, subj)
        about.setdefault(text, FitPrompt(text, "other", text, at))
    generic = [f.prompt for f in off if foreign(f.subject)]
    generic = rng.sample(generic, min(hp.n_generic, len(generic))) if generic else list(
        FALLBACK_PROMPTS)
    other = list(about.values()) + [FitPrompt(p, "other", p) for p in _dedup(generic)]
    return near + other


def _filter(items: list[FitPrompt], held: HeldOut
            ) -> tuple[list[FitPrompt], list[tuple[str, str]]]:
    kept, dropped, seen = [], [], set()
    for x in items:
        if (x.role, x.text) in seen:
            continue
        seen.add((x.role, x.text))
        hit = held.reads(x.text, x.question)
        if hit is None:
            kept.append(x)
        else:
            dropped.append((x.text, hit))
    return kept, dropped


def fit_prompts(lm, request: EditRequest, hp: SAKEHparams, facts=None,
                negatives: dict[str, list[str]] | None = None,
                exclude: Sequence[str] = ()) -> FitPrompts:
    """Every prompt SAKE's fit reads for ``request`` -- what :func:`apply` uses, and the
    only place its prompts come from: the fact prompts (:func:`fact_prompts`), the
    calibration negatives (:func:`negative_prompts`, or ``negatives``) and the subject alone.

    None of them is a prompt evaluation reads (:class:`HeldOut`: the request's paraphrase,
    neighborhood, portability and generation prompts, and ``exclude``), neither the same
    text nor the same question under another preamble; they are left out and listed in
    ``dropped``. The rewrite prompt is the request and is always used. With
    ``use_paraphrases`` the request's paraphrase prompts are fitted on too (the paraphrase
    score is then in-sample).
    """
    from .context import context_templates

    held = _held_out(request, hp, exclude)
    bases, every, dropped = _bases(request, hp, held)
    prefixes = _dedup(["{}"] + context_templates(lm, hp.context_template_length_params,
                                                 seed=hp.seed) + list(hp.prefixes))
    items = _fact_items(request, hp, prefixes, bases)
    if negatives is None:
        items += _negative_items(request, hp, facts, held, bases, every)
    else:
        items += [FitPrompt(p, "near", p) for p in negatives.get("near", [])]
        items += [FitPrompt(p, "other", p) for p in negatives.get("other", [])]
    subj = request.subject
    items += [FitPrompt(subj, "alone", subj, 0), FitPrompt("I mean " + subj, "alone",
                                                             "I mean " + subj, 7)]
    kept, more = _filter(items, held)
    return FitPrompts(kept, held, dropped + more)


def fact_prompts(lm, request: EditRequest, hp: SAKEHparams, exclude: Sequence[str] = ()
                 ) -> list[str]:
    """Every prompt of the fact's distribution (see the module docstring, step 1)."""
    from .context import context_templates

    held = _held_out(request, hp, exclude)
    bases = _bases(request, hp, held)[0]
    prefixes = _dedup(["{}"] + context_templates(lm, hp.context_template_length_params,
                                                 seed=hp.seed) + list(hp.prefixes))
    return [x.text for x in _filter(_fact_items(request, hp, prefixes, bases), held)[0]]


def negative_prompts(request: EditRequest, hp: SAKEHparams, facts=None,
                     exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """Prompts the edit must leave alone, for calibrating the scope; never a prompt
    evaluation reads (:class:`HeldOut`).

    ``near``: the fact's bare prompts with other subjects (a context prefix in front), for
    the subject gate. ``other``: other relations' prompts, about other subjects and about the
    subject itself, for the query gate. Subjects named in an evaluation prompt are never
    used. ``facts``: reference facts (default :func:`steamviz.datasets.load_reference_facts`,
    a fixed list when missing).
    """
    held = _held_out(request, hp, exclude)
    bases, every, _ = _bases(request, hp, held)
    kept = _filter(_negative_items(request, hp, facts, held, bases, every), held)[0]
    return dict(near=[x.text for x in kept if x.role == "near"],
                other=[x.text for x in kept if x.role == "other"])


# ------------------------------------------------------------------------------------------
# hidden states
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _states(lm, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 32,
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
    """Build the :class:`Scope` from the fact prompts' states ``per`` (from :func:`_states`,
    in the order of ``fit.of("fact")``) and ``fit``'s negatives and subject-alone prompts
    (:func:`fit_prompts`)."""
    ls, lq = hp.subject_layer, hp.query_layer
    facts, alone = fit.of("fact"), fit.of("alone")
    near, other = fit.texts("near"), fit.texts("other")
    if not other:
        raise ValueError("the scope needs negatives['other']: prompts of other relations")
    near_per, _ = _states(lm, near, [ls], hp.batch_size, final=False)  # up to ls only
    other_per, _ = _states(lm, other, [ls, lq], hp.batch_size, final=False)
    subj_neg = [x[ls] for x in near_per]
    subj_neg += [x[ls] for p, x in zip(other, other_per) if request.subject not in p]
    # subject gate: references at the subject's last token of each fact prompt, located from
    # the slots; negatives score their best-matching token
    # (plus the subject alone, at the start of a text and after a word: tokenizers spell
    # "Toronto" and " Toronto" differently, and a fact's prompts may have only one of them)
    alone_per, _ = _states(lm, [x.text for x in alone], [ls], hp.batch_size, final=False)
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
        h = first_tensor(out)  # [batch, seq, d]
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
        h = first_tensor(out)
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
          negatives: dict[str, list[str]] | None = None,
          exclude: Sequence[str] = ()) -> SAKEEdit:
    """Edit with SAKE; returns an undoable :class:`SAKEEdit` (hooks, no weight change).

    Every prompt the fit reads comes from :func:`fit_prompts`, which leaves out the prompts
    evaluation reads. ``negatives``: override :func:`negative_prompts`
    (``{"near": [...], "other": [...]}``; evaluation prompts among them are left out too).
    ``exclude``: more prompts the fit must not read (e.g. those of other requests evaluated
    with this edit in place). ``info["held_out"]``: how many evaluation prompts were held
    out, how many fit prompts were left out for them (``n_dropped``) and which evaluation
    prompts those would have read (``reads``).
    """
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = (hparams or SAKEHparams()).resolved(lm)
    t0 = time.perf_counter()
    fit = fit_prompts(lm, request, hp, negatives=negatives, exclude=exclude)
    prompts = fit.texts("fact")
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
    scope, calib = calibrate_scope(lm, request, fit, per, hp)
    info = dict(request=request.to_dict(), hparams=hp.to_dict(), n_prompts=len(prompts),
                fit=diag, scope=dict(scope.summary(), **calib), target_token=int(tok[0]),
                n_target_tokens=len(tok),
                held_out=dict(n_evaluation_prompts=len(fit.held_out.prompts),
                              n_dropped=len(fit.dropped),
                              reads=_dedup(q for _, q in fit.dropped)))
    edit = SAKEEdit(lm, A, b, scope, info)
    edit.info["seconds"] = time.perf_counter() - t0
    return edit


def _register() -> None:
    from .editors import register

    @register("sake", params=SAKEHparams, extra=("negatives", "exclude"))
    def _sake(lm, request, hparams=None, **kw):
        if isinstance(hparams, dict):
            hparams = SAKEHparams(**hparams)
        elif not isinstance(hparams, SAKEHparams):  # e.g. a sweep's shared ROME settings
            seed = getattr(hparams, "seed", None)
            hparams = SAKEHparams() if seed is None else SAKEHparams(seed=seed)
        negatives = kw.pop("negatives", None)
        exclude = kw.pop("exclude", ())
        if kw:
            hparams = hparams.replace(**kw)
        return apply(lm, request, hparams, negatives=negatives, exclude=exclude)


_register()
