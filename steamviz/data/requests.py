"""Edit requests: one counterfactual fact (s, r, o -> o*) with its evaluation prompts.

Readable from and writable to the ROME repo's request dict, which the whole field reuses::

    {"prompt": "{} is located in the country of", "subject": "Toronto",
     "target_new": {"str": "Japan"}, "target_true": {"str": "Canada"}}

>>> r = EditRequest.from_dict({"prompt": "{} is in", "subject": "Toronto",
...                            "target_new": {"str": "Japan"}, "target_true": "Canada"})
>>> r.rewrite_prompt, r.target_new, r.target_true
('Toronto is in', 'Japan', 'Canada')
>>> r.to_rome()["target_new"]
{'str': 'Japan'}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class RequestError(ValueError):
    """A malformed edit request: names the record and the field."""


@dataclass
class EditRequest:
    prompt: str  # template with "{}" where the subject goes
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    # neighborhood: prompts about other subjects whose true answer must be kept
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)
    # portability: questions whose answer follows from the *edited* fact
    portability_prompts: list[str] = field(default_factory=list)
    portability_answers: list[str] = field(default_factory=list)
    relation_id: str | None = None
    case_id: Any = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def validate(self, record: Any = None) -> "EditRequest":
        where = f"record {record!r}" if record is not None else f"case {self.case_id!r}"

        def bad(fld: str, why: str):
            raise RequestError(f"{where}: field {fld!r} {why}")

        for fld in ("prompt", "subject", "target_new"):
            v = getattr(self, fld)
            if not isinstance(v, str) or not v.strip():
                bad(fld, f"must be a non-empty string, got {v!r}")
        if self.prompt.count("{}") != 1:
            bad("prompt", f"must hold exactly one '{{}}' for the subject, got {self.prompt!r}")
        if "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            bad("prompt", "must not hold braces other than the '{}' slot (write a literal "
                f"brace as a character of the subject or drop it), got {self.prompt!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            bad("target_true", f"must be a string or None, got {self.target_true!r}")
        if isinstance(self.target_true, str) and \
                self.target_true.strip() == self.target_new.strip():
            bad("target_new", f"equals target_true ({self.target_new!r}): there is nothing to "
                "edit; give the new object")
        if len(self.neighborhood_prompts) != len(self.neighborhood_answers):
            bad("neighborhood_answers", "must have one answer per neighborhood prompt")
        if len(self.portability_prompts) != len(self.portability_answers):
            bad("portability_answers", "must have one answer per portability prompt")
        for fld in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers",
                    "portability_prompts", "portability_answers"):
            v = getattr(self, fld)
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                bad(fld, "must be a list of non-empty strings")
        return self

    # --- the ROME repo's request dict -------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, record: Any = None) -> "EditRequest":
        """From a ROME-style request dict (targets as ``{"str": ...}`` or plain strings) or
        from :meth:`to_dict` output."""
        where = f"record {record!r}" if record is not None else "request"
        if not isinstance(d, dict):
            raise RequestError(f"{where}: expected a dict, got {type(d).__name__}")

        def text(v, fld):
            if isinstance(v, dict):
                if "str" not in v:
                    raise RequestError(f"{where}: field {fld!r} is a dict without 'str'")
                v = v["str"]
            return v

        for fld in ("prompt", "subject", "target_new"):
            if fld not in d:
                raise RequestError(f"{where}: missing field {fld!r}")
        prompt = d["prompt"]
        subject = d["subject"]
        if isinstance(prompt, str) and "{}" not in prompt and isinstance(subject, str):
            if subject not in prompt:
                raise RequestError(
                    f"{where}: field 'prompt' has no '{{}}' and does not contain the subject "
                    f"{subject!r}"
                )
            prompt = prompt.replace(subject, "{}", 1)
        kw = {k: d.get(k) for k in ("relation_id", "case_id")}
        lists = {}
        for k in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers",
                  "portability_prompts", "portability_answers"):
            v = d.get(k) or []
            if isinstance(v, str):  # list("abc") would make one-character prompts
                raise RequestError(f"{where}: field {k!r} must be a list of strings, got the "
                                   f"string {v!r}; write [{v!r}]")
            lists[k] = list(v)
        try:
            return cls(
                prompt=prompt,
                subject=subject,
                target_new=text(d["target_new"], "target_new"),
                target_true=text(d.get("target_true"), "target_true"),
                **lists,
                **kw,
            ).validate(record)
        except RequestError as e:
            if record is not None and str(e).startswith("case"):
                raise RequestError(f"record {record!r}: {str(e).split(': ', 1)[1]}") from None
            raise

    def to_rome(self) -> dict:
        """The ROME repo's request dict."""
        out = {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": {"str": self.target_new},
        }
        if self.target_true is not None:
            out["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def check_length(self, lm, extra_tokens: int = 64) -> "EditRequest":
        """Raise :class:`RequestError` when a prompt (plus ``extra_tokens`` for context
        prefixes and answers) does not fit the model's context window."""
        window = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
        if not window:
            return self
        prompts = [self.rewrite_prompt] + self.paraphrase_prompts + self.neighborhood_prompts \
            + self.portability_prompts
        for p in prompts:
            n = len(lm.tok(p, add_special_tokens=False)["input_ids"]) + len(lm.prefix_ids)
            if n + extra_tokens > window:
                raise RequestError(
                    f"case {self.case_id!r}: a prompt of {n:,} tokens (+{extra_tokens} for "
                    f"context and answer) does not fit the model's window of {window:,} "
                    f"tokens: {p[:60]!r}...; shorten it")
        return self


def generation_prompts(req: EditRequest) -> list[str]:
    """The prompts steamviz generates from by default: the rewrite and paraphrase prompts."""
    return [req.rewrite_prompt] + list(req.paraphrase_prompts)
