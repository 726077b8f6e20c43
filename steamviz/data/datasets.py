"""Loaders for edit requests and reference facts: the project's own files and public data sets.
The reference-fact loaders live in :mod:`steamviz.data.facts` and the record readers they share in
:mod:`steamviz.data.records`; this module re-exports the former.

Edit requests (:class:`~steamviz.data.requests.EditRequest`)::

    from steamviz import fetch
    from steamviz.data.datasets import load_counterfact, load_edits, load_mquake, load_requests, load_zsre

    shared = fetch.path("counterfact").parent   # the data root: fetched, or the mirror's copy
    cf = load_counterfact(shared / "counterfact_easyedit/counterfact-val.json", limit=100)
    cf[0].rewrite_prompt, cf[0].target_new          # ('BBC One, by', 'Sega')
    zs = load_zsre(shared / "zsre_portability/zsre_portability.json")
    mq = load_mquake(shared / "mquake/MQuAKE-CF-subset.json")       # first rewrite of each case
    groups = load_mquake_all(shared / "mquake/MQuAKE-CF-subset.json")  # every rewrite, per case
    edits = load_edits()                              # the project's data/edits.jsonl
    reqs = load_requests("some_file.json")            # format sniffed from the first record

Reference facts (:class:`Fact`: subject, relation, object and a completion template)::

    facts = load_reference_facts()                    # data/reference_facts.jsonl + data/relations.json
    lre = load_lre(shared / "lre_relations", relations=["city_in_country"])
    lre[0].prompt, lre[0].object                      # ('New York City is part of', 'United States')
    pr = load_pararel(shared / "pararel", relations=["P36"])
    pr[0].template                                    # 'The capital of {} is'

Conventions shared by every loader:

- JSON (a list of records, or a single record) and JSON lines are both accepted; the format is
  decided by the content, not the file name.
- A malformed record raises :class:`~steamviz.data.requests.RequestError` whose message names the
  record (0-based position in the file, plus its case_id when it has one), the file and the
  field. Loaders parse everything before returning: there is no partial result.
- A missing file raises :class:`FileNotFoundError` saying which argument to pass.
- Target and answer strings lose surrounding whitespace (EasyEdit stores some as " Paris");
  prompts keep the subject verbatim. A filled prompt (no ``"{}"``) must contain its subject,
  whose first occurrence becomes the ``"{}"`` slot.
- ``limit`` keeps the first ``limit`` records of the file (before any filtering).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.paths import data_dir
from .requests import EditRequest, RequestError
from .facts import (  # noqa: F401 (re-exported)
    Fact,
    load_lre,
    load_pararel,
    load_reference_facts,
    load_relations,
    pararel_patterns,
)
from .records import (
    records_of,
    Where,
    as_dict,
    existing,
    need_field,
    one_or_many,
    qa_pairs,
    relation_id,
    request_of,
    string_field,
    string_list,
    template_of,
    text_field,
    where_for,
)


__all__ = [
    "REQUEST_FORMATS",
    "Fact",
    "load_counterfact",
    "load_edits",
    "load_lre",
    "load_mquake",
    "load_mquake_all",
    "load_pararel",
    "load_reference_facts",
    "load_relations",
    "load_requests",
    "load_zsre",
]

#: format names understood by :func:`load_requests` (besides ``"auto"``)
REQUEST_FORMATS = ("edits", "counterfact", "zsre", "mquake")

_LIST_FIELDS = (
    "paraphrase_prompts",
    "neighborhood_prompts",
    "neighborhood_answers",
    "portability_prompts",
    "portability_answers",
)
_EDIT_FIELDS = frozenset(
    ("prompt", "subject", "target_new", "target_true", "relation_id", "case_id") + _LIST_FIELDS
)


# --------------------------------------------------------------------------------------------
# edit requests: one parser per format
# --------------------------------------------------------------------------------------------
def _parse_edit(rec: dict, where: Where) -> EditRequest:
    unknown = sorted(set(rec) - _EDIT_FIELDS)
    if unknown:
        raise RequestError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_EDIT_FIELDS))})"
        )
    subject = string_field(need_field(rec, "subject", where), "subject", where)
    return request_of(
        where,
        prompt=template_of(need_field(rec, "prompt", where), subject, where),
        subject=subject,
        target_new=text_field(need_field(rec, "target_new", where), "target_new", where),
        target_true=text_field(rec.get("target_true"), "target_true", where, allow_none=True),
        paraphrase_prompts=string_list(rec.get("paraphrase_prompts"), "paraphrase_prompts", where),
        neighborhood_prompts=string_list(
            rec.get("neighborhood_prompts"), "neighborhood_prompts", where
        ),
        neighborhood_answers=string_list(
            rec.get("neighborhood_answers"), "neighborhood_answers", where, answers=True
        ),
        portability_prompts=string_list(rec.get("portability_prompts"), "portability_prompts", where),
        portability_answers=string_list(
            rec.get("portability_answers"), "portability_answers", where, answers=True
        ),
        relation_id=relation_id(rec.get("relation_id"), where),
        case_id=rec.get("case_id"),
    )


def _parse_rome_counterfact(rec: dict, where: Where) -> EditRequest:
    rw = need_field(rec, "requested_rewrite", where)
    if isinstance(rw, list):
        if len(rw) != 1:
            raise where.error(
                "requested_rewrite",
                f"lists {len(rw)} rewrites; load multi-edit cases with load_mquake_all",
            )
        rw = rw[0]
    if not isinstance(rw, dict):
        raise where.error("requested_rewrite", f"must be a JSON object, got {type(rw).__name__}")
    rwf = "requested_rewrite."
    subject = string_field(need_field(rw, "subject", where, rwf + "subject"), rwf + "subject", where)
    target_true = text_field(rw.get("target_true"), "requested_rewrite.target_true", where,
                        allow_none=True)
    n_prompts: list[str] = []
    n_answers: list[str] = []
    neigh = rec.get("neighborhood_prompts")
    if neigh is not None and not isinstance(neigh, list):
        raise where.error("neighborhood_prompts", f"must be a list, got {type(neigh).__name__}")
    for i, x in enumerate(neigh or []):
        fld = f"neighborhood_prompts[{i}]"
        if isinstance(x, dict):  # ROME's zsRE layout: {"prompt": ..., "target": ...}
            n_prompts.append(string_field(need_field(x, "prompt", where), f"{fld}.prompt", where))
            n_answers.append(text_field(need_field(x, "target", where), f"{fld}.target", where))
        else:
            n_prompts.append(string_field(x, fld, where))
            if target_true is None:
                raise where.error(
                    "requested_rewrite.target_true",
                    "is needed: neighborhood prompts are answered by the true target",
                )
            n_answers.append(target_true)
    return request_of(
        where,
        prompt=template_of(need_field(rw, "prompt", where, rwf + "prompt"), subject, where,
                         rwf + "prompt"),
        subject=subject,
        target_new=text_field(need_field(rw, "target_new", where, rwf + "target_new"), rwf + "target_new",
                         where),
        target_true=target_true,
        paraphrase_prompts=string_list(rec.get("paraphrase_prompts"), "paraphrase_prompts", where),
        neighborhood_prompts=n_prompts,
        neighborhood_answers=n_answers,
        relation_id=relation_id(rw.get("relation_id", rec.get("relation_id")), where),
        case_id=rec.get("case_id"),
    )


def _parse_easyedit_counterfact(rec: dict, where: Where) -> EditRequest:
    subject = string_field(need_field(rec, "subject", where), "subject", where)
    if "rephrase_prompt" in rec:
        para = one_or_many(rec["rephrase_prompt"], "rephrase_prompt", where)
    else:  # KnowEdit
        para = one_or_many(rec.get("rephrase"), "rephrase", where)
    if "locality_prompt" in rec:
        loc, loc_ans = rec["locality_prompt"], need_field(rec, "locality_ground_truth", where)
        if isinstance(loc, str):  # one prompt; an alias list is its one answer
            n_prompts = [string_field(loc, "locality_prompt", where)]
            n_answers = [text_field(loc_ans, "locality_ground_truth", where, aliases=True)]
        else:
            n_prompts = string_list(loc, "locality_prompt", where)
            n_answers = string_list(loc_ans, "locality_ground_truth", where, answers=True)
            if len(n_prompts) != len(n_answers):
                raise where.error("locality_ground_truth",
                                  "must have one answer per locality prompt")
    else:  # KnowEdit: {"Relation_Specificity": [{"prompt", "ground_truth"}], ...}
        n_prompts, n_answers = qa_pairs(rec.get("locality"), "locality", where)
    p_prompts, p_answers = qa_pairs(rec.get("portability"), "portability", where)
    return request_of(
        where,
        prompt=template_of(need_field(rec, "prompt", where), subject, where),
        subject=subject,
        target_new=text_field(need_field(rec, "target_new", where), "target_new", where),
        target_true=text_field(rec.get("ground_truth", rec.get("target_true")), "ground_truth", where,
                          allow_none=True, aliases=True),
        paraphrase_prompts=para,
        neighborhood_prompts=n_prompts,
        neighborhood_answers=n_answers,
        portability_prompts=p_prompts,
        portability_answers=p_answers,
        relation_id=relation_id(rec.get("relation_id"), where),
        case_id=rec.get("case_id"),
    )


def _parse_zsre(rec: dict, where: Where) -> EditRequest:
    subject = string_field(need_field(rec, "subject", where), "subject", where)
    answers = need_field(rec, "answers", where)
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise where.error("answers", f"must be a non-empty list of strings, got {answers!r}")
    loc = rec.get("loc")
    n_prompts = [] if loc is None else [string_field(loc, "loc", where)]
    n_answers = [] if loc is None else [text_field(need_field(rec, "loc_ans", where), "loc_ans", where)]
    p_prompts, p_answers = qa_pairs(rec.get("portability"), "portability", where)
    return request_of(
        where,
        prompt=template_of(need_field(rec, "src", where), subject, where),
        subject=subject,
        target_new=text_field(need_field(rec, "alt", where), "alt", where),
        target_true=text_field(answers[0], "answers[0]", where),
        paraphrase_prompts=one_or_many(rec.get("rephrase"), "rephrase", where),
        neighborhood_prompts=n_prompts,
        neighborhood_answers=n_answers,
        portability_prompts=p_prompts,
        portability_answers=p_answers,
        relation_id=relation_id(rec.get("relation_id"), where),
        case_id=rec.get("case_id", where.index),
    )


def _parse_mquake_group(rec: dict, where: Where) -> list[EditRequest]:
    rws = need_field(rec, "requested_rewrite", where)
    if isinstance(rws, dict):
        rws = [rws]
    if not isinstance(rws, list) or not rws:
        raise where.error("requested_rewrite", f"must be a non-empty list, got {rws!r}")
    questions = string_list(need_field(rec, "questions", where), "questions", where)
    new_answer = text_field(need_field(rec, "new_answer", where), "new_answer", where)
    group = []
    for k, rw in enumerate(rws):
        fld = f"requested_rewrite[{k}]"
        if not isinstance(rw, dict):
            raise where.error(fld, f"must be a JSON object, got {type(rw).__name__}")
        subject = string_field(need_field(rw, "subject", where, f"{fld}.subject"), f"{fld}.subject", where)
        prompt = template_of(need_field(rw, "prompt", where, f"{fld}.prompt"), subject, where,
                           f"{fld}.prompt")
        question = rw.get("question")
        group.append(request_of(
            where,
            prompt=prompt,
            subject=subject,
            target_new=text_field(need_field(rw, "target_new", where, f"{fld}.target_new"),
                             f"{fld}.target_new", where),
            target_true=text_field(rw.get("target_true"), f"{fld}.target_true", where, allow_none=True),
            paraphrase_prompts=[] if question is None else [
                string_field(question, f"{fld}.question", where)
            ],
            portability_prompts=questions if k == 0 else [],
            portability_answers=[new_answer] * len(questions) if k == 0 else [],
            relation_id=relation_id(rw.get("relation_id"), where),
            case_id=rec.get("case_id", where.index),
        ))
    return group


def _parse_all(records: list, source: str, parse: Callable[[dict, Where], Any]) -> list:
    out = []
    for i, rec in enumerate(records):
        where = where_for(source, i, rec)
        out.append(parse(as_dict(rec, where), where))
    return out


def _counterfact_parser(records: list) -> Callable[[dict, Where], EditRequest]:
    first = records[0] if records else {}
    if isinstance(first, dict) and "requested_rewrite" in first:
        return _parse_rome_counterfact
    return _parse_easyedit_counterfact


def _sniff(records: list, source: str) -> str:
    """The request format of a file, from its first record."""
    if not records:
        return "edits"
    first = records[0]
    if not isinstance(first, dict):
        raise RequestError(f"{source}: record 0 is not a JSON object; cannot tell its format")
    keys = set(first)
    if "requested_rewrite" in keys:
        if isinstance(first["requested_rewrite"], list) or "new_answer" in keys:
            return "mquake"
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if keys & {"ground_truth", "rephrase_prompt", "rephrase", "locality_prompt", "locality"}:
        return "counterfact"
    if {"prompt", "subject", "target_new"} <= keys:
        return "edits"
    raise RequestError(
        f"{source}: cannot tell the format of record 0 (keys {sorted(keys)}); pass fmt= one of "
        f"{REQUEST_FORMATS}"
    )


# --------------------------------------------------------------------------------------------
# public loaders: edit requests
# --------------------------------------------------------------------------------------------
def load_edits(path: str | Path | None = None, limit: int | None = None) -> list[EditRequest]:
    """The project's edit set: JSON lines (or a JSON list) of :class:`EditRequest` fields.

    Default ``data_dir()/"edits.jsonl"``. Fields are exactly those of :class:`EditRequest`
    (``EditRequest.to_dict()`` output; targets may also be ``{"str": ...}``, prompts may be
    filled); an unknown field is an error so that a misspelt field is not silently dropped."""
    if path is None:
        path = data_dir() / "edits.jsonl"
        existing(path, "the project's edit set", "pass path= or set $STEAMVIZ_DATA")
    records, source = records_of(path, "edit set", limit)
    return _parse_all(records, source, _parse_edit)


def load_counterfact(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """CounterFact, in the original ROME/MEMIT layout or EasyEdit's reduced one (auto-detected
    from the first record).

    - ROME ``counterfact.json``: ``requested_rewrite`` {prompt, subject, target_new,
      target_true, relation_id}, ``paraphrase_prompts``, ``neighborhood_prompts`` (answered by
      target_true; ``{"prompt", "target"}`` items as in ROME's zsRE layout are also read).
      ``attribute_prompts`` and ``generation_prompts`` have no EditRequest field and are dropped.
    - EasyEdit ``counterfact-*.json``: filled ``prompt``, ``subject``, ``target_new``,
      ``ground_truth`` (-> target_true), ``rephrase_prompt`` (-> paraphrase_prompts),
      ``locality_prompt``/``locality_ground_truth`` (-> neighborhood), optional
      ``portability`` (see :func:`load_zsre`). KnowEdit's ``rephrase``/``locality`` are read too.

    relation_id comes from the record when present (EasyEdit's files have none; Polyglot's
    fact-completion table joins it by case_id)."""
    records, source = records_of(path, "CounterFact", limit)
    return _parse_all(records, source, _counterfact_parser(records))


def load_zsre(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """zsRE in the MEND/ROME/EasyEdit layout: ``subject``, ``src`` (the question, holding the
    subject) -> prompt, ``alt`` -> target_new, ``answers[0]`` -> target_true (``pred``, a model's
    prediction, is ignored), ``rephrase`` -> paraphrase_prompts, ``loc``/``loc_ans`` ->
    neighborhood (kept verbatim, ``"nq question: "`` prefix included, as EasyEdit does).

    ``portability`` when present: ``{"New Question", "New Answer"}`` (EasyEdit), KnowEdit's
    ``[{"prompt", "ground_truth"}]`` lists, or dicts of such lists by category. case_id is the
    record's position in the file unless the record has one.

    Records whose ``alt`` equals the answer ask for no change; they are left out with a
    warning that counts them (case ids kept), rather than scored as successful edits."""
    records, source = records_of(path, "zsRE", limit)
    return _zsre_requests(records, source)


def _zsre_requests(records: list, source: str) -> list[EditRequest]:
    """Parse zsRE records, leaving out (with a counting warning) those that ask no change."""
    import warnings

    keep, same = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and isinstance(rec.get("alt"), str) and isinstance(
                rec.get("answers"), list) and rec["answers"] and isinstance(rec["answers"][0], str) \
                and rec["alt"].strip() == rec["answers"][0].strip():
            same.append(rec.get("case_id", i))
            continue
        keep.append((i, rec))
    # case ids stay the positions in the file when records were left out
    keep = [rec if not same or not isinstance(rec, dict) else dict(rec, case_id=rec.get("case_id", i))
            for i, rec in keep]
    if same:
        warnings.warn(f"{source}: {len(same)} zsRE record(s) whose 'alt' equals the answer (no "
                      f"edit to make) left out, case ids {same[:5]}{' ...' if len(same) > 5 else ''}",
                      stacklevel=2)
    return _parse_all(keep, source, _parse_zsre)


def load_mquake_all(path: str | Path, limit: int | None = None) -> list[list[EditRequest]]:
    """MQuAKE: one list per case holding one request per ``requested_rewrite`` (in order).

    Every request of a case carries the case's case_id, its relation_id, and the rewrite's
    ``question`` as a paraphrase prompt. The multi-hop ``questions`` (answered by
    ``new_answer``, which assumes *all* rewrites of the case are applied) are the portability
    prompts of the case's first request only, so each question is evaluated once per case."""
    records, source = records_of(path, "MQuAKE", limit)
    return _parse_all(records, source, _parse_mquake_group)


def load_mquake(
    path: str | Path, limit: int | None = None, single_edit_only: bool = False
) -> list[EditRequest]:
    """MQuAKE, one request per case: the case's *first* ``requested_rewrite``, with the
    multi-hop ``questions`` as portability prompts answered by ``new_answer``.

    For a case listing several rewrites, ``new_answer`` only holds once all of them are applied:
    use :func:`load_mquake_all` for those, or ``single_edit_only=True`` to drop such cases."""
    groups = load_mquake_all(path, limit)
    return [g[0] for g in groups if not (single_edit_only and len(g) > 1)]


def load_requests(
    path: str | Path, fmt: str = "auto", limit: int | None = None
) -> list[EditRequest]:
    """Edit requests from any supported file: ``fmt`` is one of :data:`REQUEST_FORMATS`
    (``"edits"``, ``"counterfact"``, ``"zsre"``, ``"mquake"``) or ``"auto"``, which sniffs the
    first record's keys. MQuAKE gives one request per case, as :func:`load_mquake`."""
    if fmt != "auto" and fmt not in REQUEST_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {REQUEST_FORMATS}")
    records, source = records_of(path, "edit request", limit)
    if fmt == "auto":
        fmt = _sniff(records, source)
    if fmt == "edits":
        return _parse_all(records, source, _parse_edit)
    if fmt == "counterfact":
        return _parse_all(records, source, _counterfact_parser(records))
    if fmt == "zsre":
        return _zsre_requests(records, source)
    return [g[0] for g in _parse_all(records, source, _parse_mquake_group)]


def load_named(data: str, limit: int | None = None) -> list[EditRequest]:
    """Requests by name: ``"default"`` (the project's edit set), ``"counterfact"`` (the
    CounterFact val set, through :mod:`steamviz.data.fetch`), or a file path (format sniffed)."""
    from . import fetch

    if data == "default":
        return load_edits(limit=limit)
    if data == "counterfact":
        return load_counterfact(
            fetch.path("counterfact", "counterfact_easyedit/counterfact-val.json"), limit=limit)
    return load_requests(data, limit=limit)
