"""The reference-fact pool: anchors for (almost) any object.

STEAM builds a new object's anchor from facts the unedited model knows about it. The
project's own facts (``data/reference_facts.jsonl``) cover 318 objects; the pool adds the
public triples of the data mirror:

- **Polyglot** (fact completion, English): CounterFact's and CalinET's true facts, with their
  own prompts and Wikidata relation ids;
- **ParaRel**: T-REx facts of 41 Wikidata relations, with a completion pattern each;
- **LRE** (factual relations): (subject, object) samples with a prompt template;
- a user's own facts file (JSON lines ``{"subject", "relation", "object", "template"}``).

Relations are named by Wikidata id where the source's name maps to one (so ``city_in_country``
of LRE and ``P17`` of ParaRel are one stratum when anchors sample by relation); a fact seen in
several sources (same subject and object) is kept once, from the first source in the order
above after the project's own. Facts are *candidates*: an anchor keeps only those the
unedited model recalls (:func:`steamviz.look.anchors.build_anchor`).

>>> facts = load_pool()                                          # doctest: +SKIP
>>> rep = coverage(lm, load_named("counterfact"), facts)          # doctest: +SKIP
>>> rep["share"]                                                  # doctest: +SKIP

Command line: ``steamviz pool --data counterfact`` prints the coverage of a request set.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from ..data.datasets import Fact, load_lre, load_pararel, load_reference_facts
from ..data.requests import RequestError

SOURCES = ("project", "polyglot", "pararel", "lre")

#: project and LRE relation names -> Wikidata ids (one stratum per relation)
RELATION_IDS = {
    # the project's relations.json
    "country_capital": "P36", "city_country": "P17", "landmark_country": "P17",
    "country_language": "P37", "country_continent": "P30", "company_country": "P17",
    "food_country": "P495", "landmark_city": "P131", "city_state": "P131",
    "country_currency": "P38",
    # LRE factual/
    "city_in_country": "P17", "country_capital_city": "P36", "landmark_in_country": "P17",
    "landmark_on_continent": "P30", "person_native_language": "P103",
    "person_occupation": "P106", "person_plays_instrument": "P1303",
    "person_plays_position_in_sport": "P413", "person_plays_pro_sport": "P641",
    "company_hq": "P159", "product_by_company": "P176", "food_from_country": "P495",
    "person_university": "P69", "star_constellation": "P59", "company_ceo": "P169",
}


def _renamed(facts, source: str) -> list[Fact]:
    return [Fact(f.subject, RELATION_IDS.get(f.relation, f.relation), f.object, f.template)
            for f in facts]


def _polyglot_rows(path):
    path = Path(path)
    if path.suffix == ".parquet":  # the published file
        import pandas as pd

        yield from pd.read_parquet(path).to_dict(orient="records")
        return
    for line in path.read_text(encoding="utf-8").splitlines():  # JSON lines
        if line.strip():
            yield json.loads(line)


def load_polyglot(path) -> list[Fact]:
    """Polyglot-or-Not English fact completion (the published parquet file, or JSON lines):
    subject, relation (Wikidata id), the true object, and the stem with the subject's first
    occurrence as the template. Rows whose stem does not contain the subject, or holds
    braces, are skipped."""
    out = []
    for r in _polyglot_rows(path):
        stem, subj, obj = r.get("stem", ""), str(r.get("subject", "")).strip(), \
            str(r.get("true", "")).strip()
        if not subj or not obj or subj not in stem or "{" in stem or "}" in stem:
            continue
        i = stem.index(subj)
        template = (stem[:i] + "{}" + stem[i + len(subj):]).strip()
        try:
            out.append(Fact(subj, str(r["relation"]), obj, template))
        except RequestError:
            continue
    return out


def load_user_facts(path) -> list[Fact]:
    """A user's facts file: JSON lines ``{"subject", "relation", "object", "template"}``
    (template with one ``{}``). A bad record raises, naming its line."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out.append(Fact(str(r["subject"]).strip(), str(r["relation"]), str(r["object"]).strip(),
                            r["template"]))
        except (ValueError, KeyError, TypeError, RequestError) as e:
            raise RequestError(f"{path}: line {n}: not a fact ({type(e).__name__}: {e}); "
                               'expected {"subject", "relation", "object", "template"}') from None
    return out


def choose_patterns(lm, n: int = 40, seed: int = 0, rule: str = "greedy",
                    exclude_subjects=(), folder=None, log=None) -> dict[str, dict]:
    """Per ParaRel relation, the usable pattern the unedited model completes best.

    ParaRel gives each relation several paraphrased patterns; the first in file order is
    often one a small model cannot complete ("{} is located in" for a continent, where
    SmolLM2 answers with a country), while another ("{} is a part of the continent of") ends
    where the model expects the object. For each relation, ``n`` facts are sampled (seeded,
    one object at a time so frequent objects do not dominate) from subjects *not* in
    ``exclude_subjects`` -- pass every subject of the requests you evaluate: CounterFact's
    prompts are ParaRel patterns, so choosing on an evaluated subject would fit on an
    evaluated prompt. Each pattern is scored by how many of them the model recalls under
    ``rule``; ties go to more first tokens in the top 10, then to file order.

    Returns ``{relation: {"template", "recalled", "top10", "n", "scores"}}`` where ``scores``
    lists every pattern's ``(template, recalled, top10)``. Recall checks are cached per model
    (:func:`steamviz.look.anchors.recalled`); raises ``EditedModelError`` under an edit.
    """
    from ..data import fetch
    from .anchors import recall_rule_ok, recalled
    from ..data.datasets import pararel_patterns

    why = recall_rule_ok(rule)
    if why:
        raise ValueError(why)
    folder = folder or fetch.path("pararel", "pararel")
    patterns = pararel_patterns(folder)
    excluded = set(exclude_subjects)
    facts = [f for f in load_pararel(folder, relations=None) if f.subject not in excluded]
    by_rel: dict[str, dict[str, list[Fact]]] = defaultdict(lambda: defaultdict(list))
    for f in facts:
        by_rel[f.relation][f.object].append(f)
    sample: dict[str, list[Fact]] = {}
    for rel in sorted(by_rel):
        rng = random.Random(f"patterns:{seed}:{rel}")
        groups = [rng.sample(g, len(g)) for _, g in sorted(by_rel[rel].items())]
        rng.shuffle(groups)
        picked: list[Fact] = []
        while len(picked) < n and any(groups):
            for g in groups:
                if g and len(picked) < n:
                    picked.append(g.pop())
        sample[rel] = picked
    probe = [Fact(f.subject, rel, f.object, t) for rel, fs in sample.items()
             for t in patterns.get(rel, []) for f in fs]
    if log:
        log(f"[pool] choosing ParaRel patterns: {len(probe):,} recall checks "
            f"({len(sample)} relations, {n} facts each, every usable pattern)")
    ok = dict(zip(probe, recalled(lm, probe, rule=rule)))
    top10 = dict(zip(probe, recalled(lm, probe, rule="top10")))
    out = {}
    for rel, fs in sample.items():
        scores = []
        for t in patterns.get(rel, []):
            fx = [Fact(f.subject, rel, f.object, t) for f in fs]
            scores.append((t, sum(ok[f] for f in fx), sum(top10[f] for f in fx)))
        if not scores:
            continue
        best = max(range(len(scores)), key=lambda i: (scores[i][1], scores[i][2], -i))
        out[rel] = dict(template=scores[best][0], recalled=scores[best][1],
                        top10=scores[best][2], n=len(fs), scores=scores)
    return out


def best_templates(lm, exclude_subjects=(), rule: str = "greedy", log=None) -> dict[str, str]:
    """``{relation: template}`` of :func:`choose_patterns` with its defaults, for
    :func:`load_pool`'s ``pararel_templates``."""
    ch = choose_patterns(lm, rule=rule, exclude_subjects=exclude_subjects, log=log)
    if log:
        moved = [r for r, c in ch.items() if c["template"] != c["scores"][0][0]]
        log(f"[pool] ParaRel patterns: {len(moved)} of {len(ch)} relations use another than "
            f"their first ({', '.join(moved)})")
    return {r: c["template"] for r, c in ch.items()}


def load_pool(sources=SOURCES, extra=None, pararel_templates: dict | None = None) -> list[Fact]:
    """Every candidate reference fact of ``sources`` (plus the facts file ``extra``),
    deduplicated by (subject, object). Public sources come through :mod:`steamviz.data.fetch`.
    ``pararel_templates``: a template per ParaRel relation (:func:`choose_patterns`; default
    each relation's first usable pattern)."""
    from ..data import fetch

    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown pool sources {sorted(unknown)}; choose from {SOURCES}")
    parts: list[list[Fact]] = []
    if extra is not None:
        parts.append(load_user_facts(extra))
    for src in SOURCES:
        if src not in sources:
            continue
        if src == "project":
            parts.append(_renamed(load_reference_facts(), src))
        elif src == "polyglot":
            parts.append(load_polyglot(fetch.path(
                "polyglot", "polyglot_fact_completion_en/en-fact-completion-3-21-23.parquet")))
        elif src == "pararel":
            parts.append(load_pararel(fetch.path("pararel", "pararel"),
                                      templates=pararel_templates))
        elif src == "lre":
            parts.append(_renamed(load_lre(fetch.path("lre", "lre_relations/factual")), src))
    seen: set[tuple[str, str]] = set()
    out = []
    for facts in parts:
        for f in facts:
            if (f.subject, f.object) not in seen:
                seen.add((f.subject, f.object))
                out.append(f)
    return out


def candidates(facts, per_relation: int | None = 30, seed: int = 0) -> list[Fact]:
    """At most ``per_relation`` facts per (object, relation), sampled with ``seed`` (bounds the
    recall checks of very common objects: ParaRel holds thousands of facts for 'English')."""
    if per_relation is None:
        return list(facts)
    groups: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        groups[(f.object, f.relation)].append(f)
    out = []
    for key in sorted(groups):
        g = groups[key]
        if len(g) > per_relation:
            g = random.Random(f"{seed}:{key[0]}:{key[1]}").sample(g, per_relation)
        out += g
    return out


def widen(lm, facts, chosen, objects, min_facts: int = 3, per_relation: int | None = 400,
          seed: int = 0, rule: str = "greedy") -> list[Fact]:
    """The adaptive second pass: ``chosen`` (a :func:`candidates` sample of ``facts``) plus,
    for each of ``objects`` with fewer than ``min_facts`` recalled facts in ``chosen``, its
    other facts in ``facts``, up to ``per_relation`` per (object, relation) in all (seeded).

    A small model recalls few facts of an object such as 'actor' (SmolLM2: a few in a
    hundred of the pool's candidates, ``docs/results.md#reference-fact-pool``), so the first
    pass's 30 per relation often leave it without an anchor while hundreds more are in the
    pool. Only objects short of an anchor pay for more recall checks; an object with enough
    recalled facts keeps exactly its first-pass sample.
    ``per_relation=0`` turns the pass off. Raises ``EditedModelError`` under an edit.
    """
    from .anchors import recalled

    if not per_relation and per_relation is not None:
        return list(chosen)
    objects = set(objects)
    first = [f for f in chosen if f.object in objects]
    good = Counter(f.object for f, ok in zip(first, recalled(lm, first, rule=rule)) if ok)
    short = {o for o in objects if good[o] < min_facts}
    have = {(f.subject, f.object) for f in chosen}
    more = [f for f in facts if f.object in short and (f.subject, f.object) not in have]
    if not more:
        return list(chosen)
    n_have = Counter((f.object, f.relation) for f in chosen if f.object in short)
    groups: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f in more:
        groups[(f.object, f.relation)].append(f)
    out = list(chosen)
    for key in sorted(groups):
        g = groups[key]
        room = len(g) if per_relation is None else max(0, per_relation - n_have[key])
        if len(g) > room:
            g = random.Random(f"widen:{seed}:{key[0]}:{key[1]}").sample(g, room)
        out += g
    return out


def coverage(lm, requests, facts, min_facts: int = 3, per_relation: int | None = 30,
             seed: int = 0, widen_to: int | None = 400, rule: str = "greedy", log=None) -> dict:
    """How many ``requests`` get an anchor for their new object from ``facts``: at least
    ``min_facts`` recalled facts, leaving every request's subject out (as a run does).
    ``per_relation`` bounds the first pass, ``widen_to`` the second (:func:`widen`; 0: off);
    ``rule``: the recall rule (:func:`steamviz.look.anchors.recall_rule_ok`).
    Returns counts, the share, how many of the anchored rest on a single relation, and per
    request the reason when there is none."""
    from .anchors import recalled

    excluded = {r.subject for r in requests}
    objects = {r.target_new for r in requests}
    usable = [f for f in facts if f.object in objects and f.subject not in excluded]
    mine = candidates(usable, per_relation, seed)
    if log:
        log(f"[pool] recall check of {len(mine):,} candidate facts for {len(objects)} objects")
    mine = widen(lm, usable, mine, objects, min_facts, widen_to, seed, rule)
    if log:
        log(f"[pool] second pass for objects short of {min_facts}: {len(mine):,} candidates")
    ok = recalled(lm, mine, rule=rule)
    found: Counter = Counter(f.object for f in mine)
    rec: dict[str, list[Fact]] = defaultdict(list)
    for f, r in zip(mine, ok):
        if r:
            rec[f.object].append(f)
    rows, anchored, single = [], 0, 0
    for r in requests:
        good = rec.get(r.target_new, [])
        rels = {f.relation for f in good}
        has = len(good) >= min_facts
        anchored += has
        single += has and len(rels) == 1
        why = None if has else (
            f"no candidate facts for {r.target_new!r}" if not found[r.target_new] else
            f"{len(good)} of {found[r.target_new]} candidate facts recalled (need {min_facts})")
        rows.append(dict(case_id=r.case_id, object=r.target_new, recalled=len(good),
                         relations=len(rels), anchored=has, reason=why))
    n = len(requests)
    return dict(requests=n, anchored=anchored, share=anchored / n if n else float("nan"),
                single_relation=single, candidates=len(mine), recalled=sum(ok),
                objects=len(objects), rows=rows)
