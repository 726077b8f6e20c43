"""References: everything a run reads from the *unedited* model, built once, before any edit.

An integration measurement compares an edited stream with the model's own knowledge: the
new object's anchor, the reference bank (kNN share, centring), and reference text
(consistency). Read from an edited model, each would measure the edit against itself. So a
run builds them all up front, from the requests it will evaluate, and hands the object to
measurement; the builders themselves refuse an edited model
(:class:`~steamviz.core.guard.EditedModelError`).

>>> refs = build_references(lm, requests)         # before the first edit   # doctest: +SKIP
>>> refs.anchor("Japan")                          # an Anchor, or None       # doctest: +SKIP
>>> refs.missing[("Mars", 0)]                     # why there is none        # doctest: +SKIP
>>> refs.controls("Japan")                        # anchors of other objects, same relations  # doctest: +SKIP

Every subject of the evaluated requests is left out of every anchor and of the bank, so an
edited subject's own facts (and the unedited rewrite prompt, labelled with the old object)
never count as the model's knowledge of an object. The result depends only on the model,
the requests and the settings, not on the order in which points run: a resumed run, a run
without unedited points and a Ray worker build the same references (:attr:`digest`).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass, field

from ..look.anchors import Anchor, AnchorError, Bank, build_anchor, reference_bank
from ..core.guard import require_unedited


@dataclass
class References:
    anchors: dict  # (object, seed) -> Anchor
    missing: dict  # (object, seed) -> why there is no anchor
    control: dict  # (object, seed) -> [other objects whose anchors share its relations]
    bank: Bank
    texts: dict  # object -> reference text (consistency); empty without generation
    exclude: tuple  # subjects left out of anchors and bank
    digest: str  # identifies what was built (goes into sweep point keys)
    settings: dict = field(default_factory=dict)

    def anchor(self, obj: str, seed: int = 0) -> Anchor | None:
        return self.anchors.get((obj, seed))

    def controls(self, obj: str, seed: int = 0) -> list[Anchor]:
        """Anchors of other objects built from the relations of ``obj``'s anchor facts: the
        control of a cosine to ``obj``'s anchor (template and position effects cancel)."""
        return [self.anchors[(o, seed)] for o in self.control.get((obj, seed), [])]

    def text(self, obj: str) -> str | None:
        return self.texts.get(obj)


def build_references(lm, requests, *, seeds=(0,), bank_size: int | None = None,
                     bank_seed: int = 0, texts: bool = False, facts=None,
                     n_control: int = 3, anchor_kw: dict | None = None,
                     per_relation: int | None = 30, widen_to: int | None = 400) -> References:
    """Build every reference the evaluation of ``requests`` reads (see module docstring).

    ``seeds``: anchor-sampling seeds (one anchor per object and seed). ``bank_size``: sample
    this many facts for the bank (``bank_seed``). ``texts``: also the reference texts of the
    new objects (for consistency). ``n_control``: control objects per new object.
    ``facts``: the candidate reference facts (default the project's; :func:`steamviz.look.pool.
    load_pool` for anchors of any object), of which at most ``per_relation`` per (object,
    relation) are considered (seeded sample, :func:`steamviz.look.pool.candidates`); objects of the
    requests short of an anchor then get up to ``widen_to`` per relation
    (:func:`steamviz.look.pool.widen`; 0: off). ``bank_size`` (default: all, at most 2,000) facts
    form the bank.
    """
    from ..look.pool import candidates, widen

    from ..data.datasets import load_reference_facts

    require_unedited(lm.model, "references")
    kw = dict(anchor_kw or {})
    facts = load_reference_facts() if facts is None else list(facts)
    exclude = tuple(sorted({r.subject for r in requests}))
    excluded = set(exclude)
    usable = [f for f in facts if f.subject not in excluded]
    pool = candidates(usable, per_relation, seed=bank_seed)
    new = sorted({r.target_new for r in requests})
    old = sorted({r.target_true for r in requests if r.target_true} - set(new))
    pool = widen(lm, usable, pool, new + old, kw.get("min_facts", 3), widen_to, bank_seed,
                 rule=kw.get("recall_rule", "greedy"))
    if bank_size is None:
        bank_size = min(len(pool), 2000)
    anchors, missing, control = {}, {}, {}
    by_object: dict[str, list] = {}  # the pool's facts per object, in pool order
    for f in pool:
        by_object.setdefault(f.object, []).append(f)

    def get(obj, seed):
        if (obj, seed) not in anchors and (obj, seed) not in missing:
            try:
                with warnings.catch_warnings():  # small anchors: one summary below
                    warnings.filterwarnings("ignore", message="anchor for .* averages only")
                    anchors[(obj, seed)] = build_anchor(lm, obj, facts=by_object.get(obj, []),
                                                        seed=seed, exclude_subjects=exclude,
                                                        **kw)
            except AnchorError as e:
                missing[(obj, seed)] = str(e)
        return anchors.get((obj, seed))

    by_relation: dict[str, set] = {}
    for f in pool:
        by_relation.setdefault(f.relation, set()).add(f.object)
    for seed in seeds:
        for obj in new + old:
            get(obj, seed)
        for obj in new:
            a = anchors.get((obj, seed))
            if a is None or not n_control:
                continue
            rels = sorted({f.relation for f in a.facts})
            cands = sorted(set().union(*(by_relation[r] for r in rels)) - {obj})
            random.Random(f"{seed}:{obj}").shuffle(cands)
            picked = []
            for c in cands[: 4 * n_control]:  # bounded: objects without an anchor are skipped
                if get(c, seed) is not None:
                    picked.append(c)
                if len(picked) == n_control:
                    break
            control[(obj, seed)] = picked
    small = sorted({o for (o, _), a in anchors.items()
                    if o in new and a.n < kw.get("warn_below", 6)})  # (controls: not warned)
    if small:
        warnings.warn(f"the anchors of {len(small)} new object(s) average fewer than "
                      f"{kw.get('warn_below', 6)} facts: {', '.join(small[:8])}"
                      f"{' ...' if len(small) > 8 else ''}", stacklevel=2)
    bank = reference_bank(lm, facts=pool, limit=bank_size, seed=bank_seed)
    ref_texts = {}
    if texts:
        from .metrics import corpus_idf, reference_text

        corpus_idf()  # consistency's IDF (fitted on WikiText): missing data fails here, early
        ref_texts = {obj: reference_text(lm, obj, facts=by_object.get(obj, [])) for obj in new}
    settings = dict(seeds=list(seeds), bank_size=bank_size, bank_seed=bank_seed, texts=texts,
                    n_control=n_control, anchor_kw=kw, per_relation=per_relation,
                    widen_to=widen_to)
    h = hashlib.sha256(repr((lm.fingerprint, exclude, sorted(settings.items(), key=str),
                             len(pool))).encode())
    for f in pool:
        h.update(f"{f.subject}\t{f.relation}\t{f.object}\t{f.template}\n".encode())
    return References(anchors, missing, control, bank, ref_texts, exclude,
                      h.hexdigest()[:16], settings)
