"""SAKE's prompts: the fit prompts (the fact's bare and context prompts, the old-object
prompts, the negatives) and the prompts evaluation reads, which the fit never sees
(issue #18.1). Part of :mod:`steamviz.edit.sake`, which re-exports these names.

>>> fit = fit_prompts(lm, request, SAKEHparams())                   # doctest: +SKIP
>>> evaluation_prompts(request)        # what the fit must not read    # doctest: +SKIP
"""


import random
import re
from dataclasses import dataclass
from typing import Sequence


from .sake_hparams import (
    FALLBACK_PROMPTS,
    FALLBACK_SUBJECTS,
    SAKEHparams,
)
from ..data.requests import EditRequest
from ..core.tokens import fill

# ------------------------------------------------------------------------------------------
# prompts: what the fit reads, and the evaluation prompts it must never read
# ------------------------------------------------------------------------------------------
def dedup(xs) -> list:
    return list(dict.fromkeys(xs))


def normalise(text: str) -> str:
    """How prompts are compared: stripped, whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def _ends_with(a: str, b: str) -> bool:
    """``a`` ends with ``b`` at a word boundary (both normalised)."""
    return a.endswith(b) and (len(a) == len(b) or not a[-len(b) - 1].isalnum())


def evaluation_prompts(request: EditRequest, exclude: Sequence[str] = ()) -> list[str]:
    """Every prompt :func:`steamviz.measure.metrics.evaluate` reads for ``request`` but its rewrite
    prompt: paraphrase, neighborhood and portability prompts, generation prompts (rewrite and
    paraphrases; the request's own ``generation_prompts`` when it has them), plus ``exclude``
    (e.g. the evaluation prompts of other requests evaluated with this edit in place).

    The rewrite prompt is the edit itself (efficacy reads it, SAKE fits on it); an evaluation
    prompt with the rewrite prompt's text is left out for the same reason."""
    from ..data.requests import generation_prompts

    out = (list(request.paraphrase_prompts) + list(request.neighborhood_prompts)
           + list(request.portability_prompts) + list(generation_prompts(request))
           + list(getattr(request, "generation_prompts", None) or []) + list(exclude))
    rewrite = normalise(request.rewrite_prompt)
    return dedup(p for p in out if normalise(p) != rewrite)


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
        from ..data.datasets import load_relations

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
            from ..data.datasets import load_reference_facts

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
    other = list(about.values()) + [FitPrompt(p, "other", p) for p in dedup(generic)]
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
    from ..core.context import context_templates

    held = _held_out(request, hp, exclude)
    bases, every, dropped = _bases(request, hp, held)
    prefixes = dedup(["{}"] + context_templates(lm, hp.context_template_length_params,
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
    from ..core.context import context_templates

    held = _held_out(request, hp, exclude)
    bases = _bases(request, hp, held)[0]
    prefixes = dedup(["{}"] + context_templates(lm, hp.context_template_length_params,
                                                 seed=hp.seed) + list(hp.prefixes))
    return [x.text for x in _filter(_fact_items(request, hp, prefixes, bases), held)[0]]


def negative_prompts(request: EditRequest, hp: SAKEHparams, facts=None,
                     exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """Prompts the edit must leave alone, for calibrating the scope; never a prompt
    evaluation reads (:class:`HeldOut`).

    ``near``: the fact's bare prompts with other subjects (a context prefix in front), for
    the subject gate. ``other``: other relations' prompts, about other subjects and about the
    subject itself, for the query gate. Subjects named in an evaluation prompt are never
    used. ``facts``: reference facts (default :func:`steamviz.data.datasets.load_reference_facts`,
    a fixed list when missing).
    """
    held = _held_out(request, hp, exclude)
    bases, every, _ = _bases(request, hp, held)
    kept = _filter(_negative_items(request, hp, facts, held, bases, every), held)[0]
    return dict(near=[x.text for x in kept if x.role == "near"],
                other=[x.text for x in kept if x.role == "other"])
