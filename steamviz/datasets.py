"""Loaders for edit requests and reference facts: the project's own files and public data sets.

Edit requests (:class:`~steamviz.requests.EditRequest`)::

    from steamviz.datasets import load_counterfact, load_edits, load_mquake, load_requests, load_zsre
    from steamviz.paths import shared_data_dir

    shared = shared_data_dir()
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
- A malformed record raises :class:`~steamviz.requests.RequestError` whose message names the
  record (0-based position in the file, plus its case_id when it has one), the file and the
  field. Loaders parse everything before returning: there is no partial result.
- A missing file raises :class:`FileNotFoundError` saying which argument to pass.
- Target and answer strings lose surrounding whitespace (EasyEdit stores some as " Paris");
  prompts keep the subject verbatim. A filled prompt (no ``"{}"``) must contain its subject,
  whose first occurrence becomes the ``"{}"`` slot.
- ``limit`` keeps the first ``limit`` records of the file (before any filtering).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import data_dir
from .requests import EditRequest, RequestError

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
# Fact
# --------------------------------------------------------------------------------------------
def _template_problem(template: Any) -> str | None:
    """Why ``template`` is not a completion template with exactly one ``"{}"``, or None."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    if template.count("{}") != 1:
        return f"must hold exactly one '{{}}' for the subject, got {template!r}"
    rest = template.replace("{}", "")
    if "{" in rest or "}" in rest:
        return f"must not hold braces other than the '{{}}' slot, got {template!r}"
    return None


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
        why = _template_problem(self.template)
        if why:
            raise RequestError(f"Fact: field 'template' {why}")

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------
class _Where:
    """Names one record in error messages: ``record 3 (case_id 10) of counterfact-val.json``."""

    def __init__(self, source: str, index: int, case_id: Any = None) -> None:
        self.source, self.index, self.case_id = source, index, case_id

    def __repr__(self) -> str:  # EditRequest's messages format the record with !r
        cid = f" (case_id {self.case_id!r})" if self.case_id is not None else ""
        return f"{self.index}{cid} of {self.source}"

    def __str__(self) -> str:
        return f"record {self!r}"

    def error(self, fld: str, why: str) -> RequestError:
        return RequestError(f"{self}: field {fld!r} {why}")


def _existing(path: str | Path, what: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found at {str(p)!r}; {hint}")
    return p


def _read_json_or_lines(path: Path) -> Any:
    """A JSON document, or the list of records of a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole_error:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if n == 1 and whole_error.msg != "Extra data":
                    # not JSON lines either: report the error of the whole document
                    raise RequestError(
                        f"{path.name}: invalid JSON ({whole_error.msg} at line "
                        f"{whole_error.lineno} column {whole_error.colno})"
                    ) from None
                raise RequestError(
                    f"{path.name}: line {n}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
        return records


def _read_records(path: Path) -> list:
    data = _read_json_or_lines(path)
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise RequestError(
            f"{path.name}: expected a JSON list of records or JSON lines, got {type(data).__name__}"
        )
    return data


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def _head(records: list, limit: int | None) -> list:
    _check_limit(limit)
    return records if limit is None else records[:limit]


def _as_dict(rec: Any, where: _Where) -> dict:
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _where_for(source: str, index: int, rec: Any) -> _Where:
    cid = rec.get("case_id") if isinstance(rec, dict) else None
    return _Where(source, index, cid)


# --------------------------------------------------------------------------------------------
# field normalisation
# --------------------------------------------------------------------------------------------
def _need(d: dict, key: str, where: _Where, fld: str | None = None) -> Any:
    """``d[key]``; ``fld`` names the field in the message (default ``key``)."""
    if key not in d:
        raise RequestError(f"{where}: missing field {fld or key!r}")
    return d[key]


def _text(
    v: Any, fld: str, where: _Where, *, allow_none: bool = False, aliases: bool = False
) -> str | None:
    """A target or answer: ``{"str": ...}`` or a string, surrounding whitespace removed. With
    ``aliases``, a (nested) list of alias strings gives its first entry (KnowEdit answers)."""
    if v is None and allow_none:
        return None
    if isinstance(v, dict):
        if "str" not in v:
            raise where.error(fld, f"is a dict without 'str': {v!r}")
        v = v["str"]
    while aliases and isinstance(v, list) and v:
        v = v[0]
    if not isinstance(v, str) or not v.strip():
        raise where.error(fld, f"must be a non-empty string, got {v!r}")
    return v.strip()


def _string(v: Any, fld: str, where: _Where) -> str:
    if not isinstance(v, str) or not v.strip():
        raise where.error(fld, f"must be a non-empty string, got {v!r}")
    return v


def _strings(v: Any, fld: str, where: _Where, *, answers: bool = False) -> list[str]:
    """A list of prompts (kept verbatim) or answers (stripped); None or absent -> []."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise where.error(fld, f"must be a list of strings, got {type(v).__name__}")
    out = []
    for i, x in enumerate(v):
        if answers:
            out.append(_text(x, f"{fld}[{i}]", where))
        else:
            out.append(_string(x, f"{fld}[{i}]", where))
    return out


def _one_or_many(v: Any, fld: str, where: _Where, *, answers: bool = False) -> list[str]:
    """A single string or a list of them (EasyEdit stores one rephrase, KnowEdit several)."""
    if isinstance(v, str):
        v = [v]
    return _strings(v, fld, where, answers=answers)


def _template(prompt: Any, subject: str, where: _Where, fld: str = "prompt") -> str:
    """The ``"{}"`` template of a template or filled prompt."""
    prompt = _string(prompt, fld, where)
    if "{}" not in prompt:
        if subject not in prompt:
            raise where.error(
                fld, f"has no '{{}}' and does not contain the subject {subject!r}: {prompt!r}"
            )
        if "{" in prompt or "}" in prompt:
            raise where.error(fld, f"holds braces, which templates cannot: {prompt!r}")
        prompt = prompt.replace(subject, "{}", 1)
    why = _template_problem(prompt)
    if why:
        raise where.error(fld, why)
    return prompt


def _request(where: _Where, **kw: Any) -> EditRequest:
    """An :class:`EditRequest`, re-labelling its own validation errors with ``where``."""
    try:
        return EditRequest(**kw).validate(where)
    except RequestError as e:
        msg = str(e)
        if msg.startswith("case "):
            msg = msg.split(": ", 1)[1]
            raise RequestError(f"{where}: {msg}") from None
        raise


def _relation_id(v: Any, where: _Where) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise where.error("relation_id", f"must be a non-empty string or absent, got {v!r}")
    return v


def _qa_pairs(v: Any, fld: str, where: _Where) -> tuple[list[str], list[str]]:
    """Question/answer pairs from EasyEdit's portability or KnowEdit's locality layouts.

    Understood: ``{"New Question": q, "New Answer": a}`` (EasyEdit zsRE), ``{"prompt": q,
    "ground_truth": a}`` (KnowEdit; ``answer``/``target`` also read), lists of those, and dicts
    of categories (``{"Subject_Aliasing": [...], "reasoning": [...]}``) holding them. Answers may
    be alias lists (their first entry is kept)."""
    prompts: list[str] = []
    answers: list[str] = []

    def pair(q: Any, a: Any, at: str, qkey: str, akey: str) -> None:
        if isinstance(q, list):  # parallel lists of questions and answers
            if not isinstance(a, list) or len(a) != len(q):
                raise where.error(f"{at}.{akey}", "must be a list as long as its questions")
            for i, (qi, ai) in enumerate(zip(q, a)):
                pair(qi, ai, f"{at}[{i}]", qkey, akey)
            return
        prompts.append(_string(q, f"{at}.{qkey}", where))
        answers.append(_text(a, f"{at}.{akey}", where, aliases=True))

    def walk(x: Any, at: str) -> None:
        if x is None:
            return
        if isinstance(x, list):
            for i, y in enumerate(x):
                walk(y, f"{at}[{i}]")
            return
        if not isinstance(x, dict):
            raise where.error(at, f"must hold question/answer dicts, got {type(x).__name__}")
        for qkey, akeys in (("New Question", ("New Answer",)),
                            ("prompt", ("ground_truth", "answer", "target"))):
            if qkey in x:
                akey = next((k for k in akeys if k in x), None)
                if akey is None:
                    raise where.error(f"{at}.{akeys[0]}", "is missing")
                pair(x[qkey], x[akey], at, qkey, akey)
                return
        for k, y in x.items():
            walk(y, f"{at}.{k}")

    walk(v, fld)
    return prompts, answers


# --------------------------------------------------------------------------------------------
# edit requests: one parser per format
# --------------------------------------------------------------------------------------------
def _parse_edit(rec: dict, where: _Where) -> EditRequest:
    unknown = sorted(set(rec) - _EDIT_FIELDS)
    if unknown:
        raise RequestError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_EDIT_FIELDS))})"
        )
    subject = _string(_need(rec, "subject", where), "subject", where)
    return _request(
        where,
        prompt=_template(_need(rec, "prompt", where), subject, where),
        subject=subject,
        target_new=_text(_need(rec, "target_new", where), "target_new", where),
        target_true=_text(rec.get("target_true"), "target_true", where, allow_none=True),
        paraphrase_prompts=_strings(rec.get("paraphrase_prompts"), "paraphrase_prompts", where),
        neighborhood_prompts=_strings(
            rec.get("neighborhood_prompts"), "neighborhood_prompts", where
        ),
        neighborhood_answers=_strings(
            rec.get("neighborhood_answers"), "neighborhood_answers", where, answers=True
        ),
        portability_prompts=_strings(rec.get("portability_prompts"), "portability_prompts", where),
        portability_answers=_strings(
            rec.get("portability_answers"), "portability_answers", where, answers=True
        ),
        relation_id=_relation_id(rec.get("relation_id"), where),
        case_id=rec.get("case_id"),
    )


def _parse_rome_counterfact(rec: dict, where: _Where) -> EditRequest:
    rw = _need(rec, "requested_rewrite", where)
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
    subject = _string(_need(rw, "subject", where, rwf + "subject"), rwf + "subject", where)
    target_true = _text(rw.get("target_true"), "requested_rewrite.target_true", where,
                        allow_none=True)
    n_prompts: list[str] = []
    n_answers: list[str] = []
    neigh = rec.get("neighborhood_prompts")
    if neigh is not None and not isinstance(neigh, list):
        raise where.error("neighborhood_prompts", f"must be a list, got {type(neigh).__name__}")
    for i, x in enumerate(neigh or []):
        fld = f"neighborhood_prompts[{i}]"
        if isinstance(x, dict):  # ROME's zsRE layout: {"prompt": ..., "target": ...}
            n_prompts.append(_string(_need(x, "prompt", where), f"{fld}.prompt", where))
            n_answers.append(_text(_need(x, "target", where), f"{fld}.target", where))
        else:
            n_prompts.append(_string(x, fld, where))
            if target_true is None:
                raise where.error(
                    "requested_rewrite.target_true",
                    "is needed: neighborhood prompts are answered by the true target",
                )
            n_answers.append(target_true)
    return _request(
        where,
        prompt=_template(_need(rw, "prompt", where, rwf + "prompt"), subject, where,
                         rwf + "prompt"),
        subject=subject,
        target_new=_text(_need(rw, "target_new", where, rwf + "target_new"), rwf + "target_new",
                         where),
        target_true=target_true,
        paraphrase_prompts=_strings(rec.get("paraphrase_prompts"), "paraphrase_prompts", where),
        neighborhood_prompts=n_prompts,
        neighborhood_answers=n_answers,
        relation_id=_relation_id(rw.get("relation_id", rec.get("relation_id")), where),
        case_id=rec.get("case_id"),
    )


def _parse_easyedit_counterfact(rec: dict, where: _Where) -> EditRequest:
    subject = _string(_need(rec, "subject", where), "subject", where)
    if "rephrase_prompt" in rec:
        para = _one_or_many(rec["rephrase_prompt"], "rephrase_prompt", where)
    else:  # KnowEdit
        para = _one_or_many(rec.get("rephrase"), "rephrase", where)
    if "locality_prompt" in rec:
        loc, loc_ans = rec["locality_prompt"], _need(rec, "locality_ground_truth", where)
        if isinstance(loc, str):  # one prompt; an alias list is its one answer
            n_prompts = [_string(loc, "locality_prompt", where)]
            n_answers = [_text(loc_ans, "locality_ground_truth", where, aliases=True)]
        else:
            n_prompts = _strings(loc, "locality_prompt", where)
            n_answers = _strings(loc_ans, "locality_ground_truth", where, answers=True)
            if len(n_prompts) != len(n_answers):
                raise where.error("locality_ground_truth",
                                  "must have one answer per locality prompt")
    else:  # KnowEdit: {"Relation_Specificity": [{"prompt", "ground_truth"}], ...}
        n_prompts, n_answers = _qa_pairs(rec.get("locality"), "locality", where)
    p_prompts, p_answers = _qa_pairs(rec.get("portability"), "portability", where)
    return _request(
        where,
        prompt=_template(_need(rec, "prompt", where), subject, where),
        subject=subject,
        target_new=_text(_need(rec, "target_new", where), "target_new", where),
        target_true=_text(rec.get("ground_truth", rec.get("target_true")), "ground_truth", where,
                          allow_none=True, aliases=True),
        paraphrase_prompts=para,
        neighborhood_prompts=n_prompts,
        neighborhood_answers=n_answers,
        portability_prompts=p_prompts,
        portability_answers=p_answers,
        relation_id=_relation_id(rec.get("relation_id"), where),
        case_id=rec.get("case_id"),
    )


def _parse_zsre(rec: dict, where: _Where) -> EditRequest:
    subject = _string(_need(rec, "subject", where), "subject", where)
    answers = _need(rec, "answers", where)
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise where.error("answers", f"must be a non-empty list of strings, got {answers!r}")
    loc = rec.get("loc")
    n_prompts = [] if loc is None else [_string(loc, "loc", where)]
    n_answers = [] if loc is None else [_text(_need(rec, "loc_ans", where), "loc_ans", where)]
    p_prompts, p_answers = _qa_pairs(rec.get("portability"), "portability", where)
    return _request(
        where,
        prompt=_template(_need(rec, "src", where), subject, where),
        subject=subject,
        target_new=_text(_need(rec, "alt", where), "alt", where),
        target_true=_text(answers[0], "answers[0]", where),
        paraphrase_prompts=_one_or_many(rec.get("rephrase"), "rephrase", where),
        neighborhood_prompts=n_prompts,
        neighborhood_answers=n_answers,
        portability_prompts=p_prompts,
        portability_answers=p_answers,
        relation_id=_relation_id(rec.get("relation_id"), where),
        case_id=rec.get("case_id", where.index),
    )


def _parse_mquake_group(rec: dict, where: _Where) -> list[EditRequest]:
    rws = _need(rec, "requested_rewrite", where)
    if isinstance(rws, dict):
        rws = [rws]
    if not isinstance(rws, list) or not rws:
        raise where.error("requested_rewrite", f"must be a non-empty list, got {rws!r}")
    questions = _strings(_need(rec, "questions", where), "questions", where)
    new_answer = _text(_need(rec, "new_answer", where), "new_answer", where)
    group = []
    for k, rw in enumerate(rws):
        fld = f"requested_rewrite[{k}]"
        if not isinstance(rw, dict):
            raise where.error(fld, f"must be a JSON object, got {type(rw).__name__}")
        subject = _string(_need(rw, "subject", where, f"{fld}.subject"), f"{fld}.subject", where)
        prompt = _template(_need(rw, "prompt", where, f"{fld}.prompt"), subject, where,
                           f"{fld}.prompt")
        question = rw.get("question")
        group.append(_request(
            where,
            prompt=prompt,
            subject=subject,
            target_new=_text(_need(rw, "target_new", where, f"{fld}.target_new"),
                             f"{fld}.target_new", where),
            target_true=_text(rw.get("target_true"), f"{fld}.target_true", where, allow_none=True),
            paraphrase_prompts=[] if question is None else [
                _string(question, f"{fld}.question", where)
            ],
            portability_prompts=questions if k == 0 else [],
            portability_answers=[new_answer] * len(questions) if k == 0 else [],
            relation_id=_relation_id(rw.get("relation_id"), where),
            case_id=rec.get("case_id", where.index),
        ))
    return group


def _parse_all(records: list, source: str, parse: Callable[[dict, _Where], Any]) -> list:
    out = []
    for i, rec in enumerate(records):
        where = _where_for(source, i, rec)
        out.append(parse(_as_dict(rec, where), where))
    return out


def _counterfact_parser(records: list) -> Callable[[dict, _Where], EditRequest]:
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


def _records_of(path: str | Path, what: str, limit: int | None) -> tuple[list, str]:
    _check_limit(limit)
    p = _existing(path, what, f"pass the path of the {what} file")
    return _head(_read_records(p), limit), p.name


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
        _existing(path, "the project's edit set", "pass path= or set $STEAMVIZ_DATA")
    records, source = _records_of(path, "edit set", limit)
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
    records, source = _records_of(path, "CounterFact", limit)
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
    records, source = _records_of(path, "zsRE", limit)
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
    records, source = _records_of(path, "MQuAKE", limit)
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
    records, source = _records_of(path, "edit request", limit)
    if fmt == "auto":
        fmt = _sniff(records, source)
    if fmt == "edits":
        return _parse_all(records, source, _parse_edit)
    if fmt == "counterfact":
        return _parse_all(records, source, _counterfact_parser(records))
    if fmt == "zsre":
        return _zsre_requests(records, source)
    return [g[0] for g in _parse_all(records, source, _parse_mquake_group)]


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
        _existing(path, "the project's relation table", "pass path= or set $STEAMVIZ_DATA")
    p = _existing(path, "relation table", "pass the path of relations.json")
    data = _read_json_or_lines(p)
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
        why = _template_problem(entry["template"])
        if why:
            raise RequestError(f"{where}: field 'template' {why}")
        paras = entry.get("paraphrases", [])
        if not isinstance(paras, list):
            raise RequestError(f"{where}: field 'paraphrases' must be a list of templates")
        for i, t in enumerate(paras):
            why = _template_problem(t)
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
        _existing(path, "the project's reference facts", "pass path= or set $STEAMVIZ_DATA")
    records, source = _records_of(path, "reference facts", None)
    if relations is None or isinstance(relations, (str, Path)):
        relations = load_relations(relations)
    out = []
    for i, rec in enumerate(records):
        where = _Where(source, i)
        rec = _as_dict(rec, where)
        subject = _string(_need(rec, "subject", where), "subject", where)
        rel = _string(_need(rec, "relation", where), "relation", where)
        obj = _text(_need(rec, "object", where), "object", where)
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
    p = _existing(path_or_dir, "LRE data", "pass an LRE relation file or the lre_relations folder")
    files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise ValueError(f"LRE: relation {f.stem!r} is in both {by_stem[f.stem]} and {f}")
        by_stem[f.stem] = f
    facts: list[Fact] = []
    for rel in _select(by_stem, relations, f"LRE data at {p}"):
        f = by_stem[rel]
        data = _read_json_or_lines(f)
        where = f"LRE file {f.name}"
        if not isinstance(data, dict):
            raise RequestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        templates = data.get("prompt_templates")
        if not isinstance(templates, list) or not templates:
            raise RequestError(f"{where}: field 'prompt_templates' must be a non-empty list")
        why = _template_problem(templates[0])
        if why:
            raise RequestError(f"{where}: field 'prompt_templates[0]' {why}")
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise RequestError(f"{where}: field 'samples' must be a list")
        rel_facts = []
        for i, s in enumerate(samples):
            w = _Where(f.name, i)
            s = _as_dict(s, w)
            subject = _string(_need(s, "subject", w), "subject", w).strip()
            obj = _text(_need(s, "object", w), "object", w)
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
    root = _existing(folder, "ParaRel data", "pass the pararel folder (holding pattern_data/)")
    pattern_dir = root / "pattern_data" / "graphs_json"
    _existing(pattern_dir, "ParaRel folder", "pass the pararel folder (holding pattern_data/)")
    out: dict[str, list[str]] = {}
    for pf in sorted(pattern_dir.glob("P*.jsonl")):
        usable = []
        for i, rec in enumerate(_read_records(pf)):
            w = _Where(pf.name, i)
            t = _pararel_template(_string(_need(_as_dict(rec, w), "pattern", w), "pattern", w))
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
    relation (one of its usable patterns, e.g. from :func:`steamviz.pool.choose_patterns`)
    that replaces pattern ``pattern_index`` for that relation."""
    root = _existing(folder, "ParaRel data", "pass the pararel folder (holding trex_lms_vocab/)")
    fact_dir = root / "trex_lms_vocab"
    pattern_dir = root / "pattern_data" / "graphs_json"
    for d in (fact_dir, pattern_dir):
        _existing(d, "ParaRel folder", f"pass the pararel folder (holding {d.relative_to(root)}/)")
    if not isinstance(pattern_index, int) or pattern_index < 0:
        raise ValueError(f"pattern_index must be a non-negative int, got {pattern_index!r}")
    fact_files = {f.stem: f for f in fact_dir.glob("P*.jsonl")}
    explicit = relations is not None
    facts: list[Fact] = []
    for rel in _select(fact_files, relations, f"ParaRel facts in {fact_dir}"):
        pf = pattern_dir / f"{rel}.jsonl"
        usable: list[str] = []
        if pf.exists():
            for i, rec in enumerate(_read_records(pf)):
                w = _Where(pf.name, i)
                t = _pararel_template(_string(_need(_as_dict(rec, w), "pattern", w), "pattern", w))
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
        for i, rec in enumerate(_read_records(fact_files[rel])):
            w = _Where(fact_files[rel].name, i)
            rec = _as_dict(rec, w)
            subject = _string(_need(rec, "sub_label", w), "sub_label", w).strip()
            obj = _text(_need(rec, "obj_label", w), "obj_label", w)
            rel_facts.append(Fact(subject, rel, obj, template))
        facts.extend(_dedup(rel_facts))
    return facts


def load_named(data: str, limit: int | None = None) -> list[EditRequest]:
    """Requests by name: ``"default"`` (the project's edit set), ``"counterfact"`` (the
    CounterFact val set, through :mod:`steamviz.fetch`), or a file path (format sniffed)."""
    from . import fetch

    if data == "default":
        return load_edits(limit=limit)
    if data == "counterfact":
        return load_counterfact(
            fetch.path("counterfact", "counterfact_easyedit/counterfact-val.json"), limit=limit)
    return load_requests(data, limit=limit)
