"""Reading records: JSON or JSON-lines files, and typed fields whose errors name the record
and the field (``record 3 (case_id 10) of counterfact-val.json: field 'subject' ...``). The
loaders of :mod:`steamviz.data.datasets` and :mod:`steamviz.data.facts` are built from these.

>>> need_field({"subject": "Paris"}, "subject", Where("edits.jsonl", 0))
'Paris'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .requests import EditRequest, RequestError


def template_problem(template: Any) -> str | None:
    """Why ``template`` is not a completion template with exactly one ``"{}"``, or None."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    if template.count("{}") != 1:
        return f"must hold exactly one '{{}}' for the subject, got {template!r}"
    rest = template.replace("{}", "")
    if "{" in rest or "}" in rest:
        return f"must not hold braces other than the '{{}}' slot, got {template!r}"
    return None




# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------
class Where:
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


def existing(path: str | Path, what: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found at {str(p)!r}; {hint}")
    return p


def read_json_or_lines(path: Path) -> Any:
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


def read_records(path: Path) -> list:
    data = read_json_or_lines(path)
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise RequestError(
            f"{path.name}: expected a JSON list of records or JSON lines, got {type(data).__name__}"
        )
    return data


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def head_of(records: list, limit: int | None) -> list:
    check_limit(limit)
    return records if limit is None else records[:limit]


def as_dict(rec: Any, where: Where) -> dict:
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def where_for(source: str, index: int, rec: Any) -> Where:
    cid = rec.get("case_id") if isinstance(rec, dict) else None
    return Where(source, index, cid)


# --------------------------------------------------------------------------------------------
# field normalisation
# --------------------------------------------------------------------------------------------
def need_field(d: dict, key: str, where: Where, fld: str | None = None) -> Any:
    """``d[key]``; ``fld`` names the field in the message (default ``key``)."""
    if key not in d:
        raise RequestError(f"{where}: missing field {fld or key!r}")
    return d[key]


def text_field(
    v: Any, fld: str, where: Where, *, allow_none: bool = False, aliases: bool = False
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


def string_field(v: Any, fld: str, where: Where) -> str:
    if not isinstance(v, str) or not v.strip():
        raise where.error(fld, f"must be a non-empty string, got {v!r}")
    return v


def string_list(v: Any, fld: str, where: Where, *, answers: bool = False) -> list[str]:
    """A list of prompts (kept verbatim) or answers (stripped); None or absent -> []."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise where.error(fld, f"must be a list of strings, got {type(v).__name__}")
    out = []
    for i, x in enumerate(v):
        if answers:
            out.append(text_field(x, f"{fld}[{i}]", where))
        else:
            out.append(string_field(x, f"{fld}[{i}]", where))
    return out


def one_or_many(v: Any, fld: str, where: Where, *, answers: bool = False) -> list[str]:
    """A single string or a list of them (EasyEdit stores one rephrase, KnowEdit several)."""
    if isinstance(v, str):
        v = [v]
    return string_list(v, fld, where, answers=answers)


def template_of(prompt: Any, subject: str, where: Where, fld: str = "prompt") -> str:
    """The ``"{}"`` template of a template or filled prompt."""
    prompt = string_field(prompt, fld, where)
    if "{}" not in prompt:
        if subject not in prompt:
            raise where.error(
                fld, f"has no '{{}}' and does not contain the subject {subject!r}: {prompt!r}"
            )
        if "{" in prompt or "}" in prompt:
            raise where.error(fld, f"holds braces, which templates cannot: {prompt!r}")
        prompt = prompt.replace(subject, "{}", 1)
    why = template_problem(prompt)
    if why:
        raise where.error(fld, why)
    return prompt


def request_of(where: Where, **kw: Any) -> EditRequest:
    """An :class:`EditRequest`, re-labelling its own validation errors with ``where``."""
    try:
        return EditRequest(**kw).validate(where)
    except RequestError as e:
        msg = str(e)
        if msg.startswith("case "):
            msg = msg.split(": ", 1)[1]
            raise RequestError(f"{where}: {msg}") from None
        raise


def relation_id(v: Any, where: Where) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise where.error("relation_id", f"must be a non-empty string or absent, got {v!r}")
    return v


def qa_pairs(v: Any, fld: str, where: Where) -> tuple[list[str], list[str]]:
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
        prompts.append(string_field(q, f"{at}.{qkey}", where))
        answers.append(text_field(a, f"{at}.{akey}", where, aliases=True))

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


def records_of(path: str | Path, what: str, limit: int | None) -> tuple[list, str]:
    """The first ``limit`` records of the file at ``path`` and its name (for messages)."""
    check_limit(limit)
    p = existing(path, what, f"pass the path of the {what} file")
    return head_of(read_records(p), limit), p.name
