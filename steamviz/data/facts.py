"""Reference facts: :class:`Fact` (a subject, relation, object triple and the completion
template that asks it), the project's relations and reference facts, and the public triples of
LRE and ParaRel (:func:`load_lre`, :func:`load_pararel`). :mod:`steamviz.data.datasets` re-exports
these names.

>>> Fact("Paris", "P17", "France", "{} is located in the country of").prompt
'Paris is located in the country of'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.paths import data_dir
from .requests import RequestError
from .records import (
    records_of,
    Where,
    as_dict,
    existing,
    need_field,
    read_json_or_lines,
    read_records,
    string_field,
    template_problem,
    text_field,
)


@dataclass(frozen=True)
class Fact:
    """A reference triple (subject, relation, object) with the completion template asking it.

    >>> f = Fact("Paris", "P17", "France", "{} is located in the country of")
    >>> f.prompt
    'Paris is located in the country of'
    """

    subject: str
    relation: str
    object: str
    template: str  # exactly one "{}" where the subject goes

    def __post_init__(self) -> None:
        for fld in ("subject", "relation", "object"):
            v = getattr(self, fld)
            if not isinstance(v, str) or not v.strip():
                raise RequestError(f"Fact: field {fld!r} must be a non-empty string, got {v!r}")
        why = template_problem(self.template)
        if why:
            raise RequestError(f"Fact: field 'template' {why}")

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)



# --------------------------------------------------------------------------------------------
# public loaders: relations and reference facts
# --------------------------------------------------------------------------------------------
def load_relations(path: str | Path | None = None) -> dict[str, dict]:
    """The project's relation table: ``{relation_id: {"name", "template", "paraphrases",
    "subject_type", "object_type"}}``, default ``data_dir()/"relations.json"``.

    Checked: every entry is an object whose ``template`` (and each of ``paraphrases``, when
    present) holds exactly one ``"{}"``. Entries are returned as read (copied)."""
    if path is None:
        path = data_dir() / "relations.json"
        existing(path, "the project's relation table", "pass path= or set $STEAMVIZ_DATA")
    p = existing(path, "relation table", "pass the path of relations.json")
    data = read_json_or_lines(p)
    if not isinstance(data, dict):
        raise RequestError(
            f"{p.name}: expected a JSON object {{relation_id: {{...}}}}, got {type(data).__name__}"
        )
    out: dict[str, dict] = {}
    for rid, entry in data.items():
        where = f"relation {rid!r} of {p.name}"
        if not isinstance(entry, dict):
            raise RequestError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        if "template" not in entry:
            raise RequestError(f"{where}: missing field 'template'")
        why = template_problem(entry["template"])
        if why:
            raise RequestError(f"{where}: field 'template' {why}")
        paras = entry.get("paraphrases", [])
        if not isinstance(paras, list):
            raise RequestError(f"{where}: field 'paraphrases' must be a list of templates")
        for i, t in enumerate(paras):
            why = template_problem(t)
            if why:
                raise RequestError(f"{where}: field 'paraphrases[{i}]' {why}")
        for fld in ("name", "subject_type", "object_type"):
            if fld in entry and not isinstance(entry[fld], str):
                raise RequestError(f"{where}: field {fld!r} must be a string")
        out[str(rid)] = dict(entry, paraphrases=list(paras))
    return out


def load_reference_facts(
    path: str | Path | None = None, relations: Mapping[str, dict] | str | Path | None = None
) -> list[Fact]:
    """The project's reference triples: JSON lines ``{"subject", "relation", "object"}``,
    default ``data_dir()/"reference_facts.jsonl"``. Each fact's template is its relation's
    ``template`` in ``relations`` (a table as returned by :func:`load_relations`, or its path;
    default the project's ``relations.json``). An unknown relation is an error."""
    if path is None:
        path = data_dir() / "reference_facts.jsonl"
        existing(path, "the project's reference facts", "pass path= or set $STEAMVIZ_DATA")
    records, source = records_of(path, "reference facts", None)
    if relations is None or isinstance(relations, (str, Path)):
        relations = load_relations(relations)
    out = []
    for i, rec in enumerate(records):
        where = Where(source, i)
        rec = as_dict(rec, where)
        subject = string_field(need_field(rec, "subject", where), "subject", where)
        rel = string_field(need_field(rec, "relation", where), "relation", where)
        obj = text_field(need_field(rec, "object", where), "object", where)
        if rel not in relations:
            raise where.error("relation", f"names unknown relation {rel!r} (not in relations)")
        out.append(Fact(subject, rel, obj, relations[rel]["template"]))
    return out


def _dedup(facts: list[Fact]) -> list[Fact]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in facts:
        key = (f.subject, f.relation, f.object)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _select(available: dict[str, Any], relations: Iterable[str] | None, what: str) -> list[str]:
    if relations is None:
        return sorted(available)
    if isinstance(relations, str):
        relations = [relations]
    wanted = list(relations)
    missing = [r for r in wanted if r not in available]
    if missing:
        raise ValueError(
            f"{what}: no relation {missing} (available: {', '.join(sorted(available))})"
        )
    return wanted


def load_lre(
    path_or_dir: str | Path, relations: Iterable[str] | None = None
) -> list[Fact]:
    """LRE relation files (Hernandez et al. 2023): one ``*.json`` file, or a folder searched
    recursively. relation = file stem (``city_in_country``), template = the first
    ``prompt_templates`` entry, facts = ``samples`` [{subject, object}] with surrounding
    whitespace removed and exact duplicates dropped. ``relations`` keeps only those file stems
    (an unknown one is an error)."""
    p = existing(path_or_dir, "LRE data", "pass an LRE relation file or the lre_relations folder")
    files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise ValueError(f"LRE: relation {f.stem!r} is in both {by_stem[f.stem]} and {f}")
        by_stem[f.stem] = f
    facts: list[Fact] = []
    for rel in _select(by_stem, relations, f"LRE data at {p}"):
        f = by_stem[rel]
        data = read_json_or_lines(f)
        where = f"LRE file {f.name}"
        if not isinstance(data, dict):
            raise RequestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        templates = data.get("prompt_templates")
        if not isinstance(templates, list) or not templates:
            raise RequestError(f"{where}: field 'prompt_templates' must be a non-empty list")
        why = template_problem(templates[0])
        if why:
            raise RequestError(f"{where}: field 'prompt_templates[0]' {why}")
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise RequestError(f"{where}: field 'samples' must be a list")
        rel_facts = []
        for i, s in enumerate(samples):
            w = Where(f.name, i)
            s = as_dict(s, w)
            subject = string_field(need_field(s, "subject", w), "subject", w).strip()
            obj = text_field(need_field(s, "object", w), "object", w)
            rel_facts.append(Fact(subject, rel, obj, templates[0]))
        facts.extend(_dedup(rel_facts))
    return facts


_Y_LAST = re.compile(r"^(?P<head>.*?)\s*\[Y\]\s*\.?\s*$")


def _pararel_template(pattern: str) -> str | None:
    """``"The capital of [X] is [Y] ."`` -> ``"The capital of {} is"``; None when [Y] does not
    end the sentence, or the pattern does not hold exactly one [X] and one [Y], or holds braces."""
    if pattern.count("[X]") != 1 or pattern.count("[Y]") != 1 or "{" in pattern or "}" in pattern:
        return None
    m = _Y_LAST.match(pattern)
    if not m or not m["head"].strip():
        return None
    return m["head"].replace("[X]", "{}")


def pararel_patterns(folder: str | Path) -> dict[str, list[str]]:
    """Every relation's usable ParaRel patterns as templates, in file order (``[Y]`` ends the
    sentence; see :func:`load_pararel`). Relations without one are left out."""
    root = existing(folder, "ParaRel data", "pass the pararel folder (holding pattern_data/)")
    pattern_dir = root / "pattern_data" / "graphs_json"
    existing(pattern_dir, "ParaRel folder", "pass the pararel folder (holding pattern_data/)")
    out: dict[str, list[str]] = {}
    for pf in sorted(pattern_dir.glob("P*.jsonl")):
        usable = []
        for i, rec in enumerate(read_records(pf)):
            w = Where(pf.name, i)
            t = _pararel_template(string_field(need_field(as_dict(rec, w), "pattern", w), "pattern", w))
            if t is not None and t not in usable:
                usable.append(t)
        if usable:
            out[pf.stem] = usable
    return out


def load_pararel(
    folder: str | Path, relations: Iterable[str] | None = None, pattern_index: int = 0,
    templates: dict[str, str] | None = None,
) -> list[Fact]:
    """ParaRel facts (T-REx labels, ``trex_lms_vocab/P*.jsonl``) with a completion template
    from ``pattern_data/graphs_json/P*.jsonl``.

    Only patterns where ``[Y]`` ends the sentence are usable (a trailing ``" ."``/``"."`` is
    removed, ``[X]`` becomes ``"{}"``); ``pattern_index`` picks among those usable patterns, in
    file order. relation = the P-id. With ``relations=None`` every relation that has facts and a
    usable pattern number ``pattern_index`` is loaded (the release has facts without patterns
    for P31 and P527); a relation named in ``relations`` that lacks one is an error. Labels lose
    surrounding whitespace; exact duplicate facts are dropped. ``templates``: a template per
    relation (one of its usable patterns, e.g. from :func:`steamviz.look.pool.choose_patterns`)
    that replaces pattern ``pattern_index`` for that relation."""
    root = existing(folder, "ParaRel data", "pass the pararel folder (holding trex_lms_vocab/)")
    fact_dir = root / "trex_lms_vocab"
    pattern_dir = root / "pattern_data" / "graphs_json"
    for d in (fact_dir, pattern_dir):
        existing(d, "ParaRel folder", f"pass the pararel folder (holding {d.relative_to(root)}/)")
    if not isinstance(pattern_index, int) or pattern_index < 0:
        raise ValueError(f"pattern_index must be a non-negative int, got {pattern_index!r}")
    fact_files = {f.stem: f for f in fact_dir.glob("P*.jsonl")}
    explicit = relations is not None
    facts: list[Fact] = []
    for rel in _select(fact_files, relations, f"ParaRel facts in {fact_dir}"):
        pf = pattern_dir / f"{rel}.jsonl"
        usable: list[str] = []
        if pf.exists():
            for i, rec in enumerate(read_records(pf)):
                w = Where(pf.name, i)
                t = _pararel_template(string_field(need_field(as_dict(rec, w), "pattern", w), "pattern", w))
                if t is not None:
                    usable.append(t)
        if pattern_index >= len(usable):
            if explicit:
                raise ValueError(
                    f"ParaRel relation {rel}: no usable pattern #{pattern_index} "
                    f"({len(usable)} patterns end with [Y] in {pf})"
                )
            continue
        template = usable[pattern_index]
        if templates and rel in templates:
            if templates[rel] not in usable:
                raise ValueError(f"ParaRel relation {rel}: template {templates[rel]!r} is not one of "
                                 f"its usable patterns {usable}")
            template = templates[rel]
        rel_facts = []
        for i, rec in enumerate(read_records(fact_files[rel])):
            w = Where(fact_files[rel].name, i)
            rec = as_dict(rec, w)
            subject = string_field(need_field(rec, "sub_label", w), "sub_label", w).strip()
            obj = text_field(need_field(rec, "obj_label", w), "obj_label", w)
            rel_facts.append(Fact(subject, rel, obj, template))
        facts.extend(_dedup(rel_facts))
    return facts
