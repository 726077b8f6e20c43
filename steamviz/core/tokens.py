"""Tokenizing prompts the one way steamviz does it everywhere.

Every prompt is tokenized with ``add_special_tokens=False`` and the model's start tokens
(``LM.prefix_ids``) are put first, so a subject at the start of a prompt sees the same
context as one after a prefix. Batches are right-padded: positions of real tokens are
unchanged, and each prompt's last real token is at ``lengths - 1``.

>>> b = encode(lm, ["The capital of France is"])  # doctest: +SKIP
>>> b.input_ids.shape, b.lengths                     # doctest: +SKIP
(torch.Size([1, 6]), tensor([6]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    lengths: torch.Tensor  # [batch] number of real tokens

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)

    @property
    def last(self) -> torch.Tensor:
        """Index of each prompt's last real token (the one that predicts the answer)."""
        return self.lengths - 1


def token_ids(lm, text: str) -> list[int]:
    """Ids of ``text`` without special tokens (no start tokens)."""
    return list(lm.tok(text, add_special_tokens=False)["input_ids"])


def encode(lm, prompts: list[str], device=None) -> Batch:
    """Right-padded batch of ``prefix_ids + tokens(prompt)``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [list(lm.prefix_ids) + token_ids(lm, p) for p in prompts]
    return pad(ids, lm.tok.pad_token_id, device or lm.device)


def pad(ids: list[list[int]], pad_id: int, device) -> Batch:
    if not ids or min(len(x) for x in ids) == 0:
        raise ValueError("cannot encode an empty prompt")
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    return Batch(input_ids.to(device), mask.to(device), lengths)


def fill(template: str, subject: str) -> tuple[str, int]:
    """``template`` with its ``{}`` slot filled by ``subject``, and the character offset of
    the subject in the result (where the slot was; not a search for the subject's text).

    >>> fill("Toronto is big. {} is in", "Toronto")
    ('Toronto is big. Toronto is in', 16)
    """
    i = template.find("{}")
    if i < 0:
        raise ValueError(f"template {template!r} has no '{{}}' slot for the subject")
    return template[:i] + subject + template[i + 2 :], i


def subject_span(lm, prompt: str, subject: str, start: int | None = None) -> tuple[int, int]:
    """Token indices ``(first, last)`` of ``subject`` inside ``prompt`` (inclusive), counted
    in the prefixed token sequence that :func:`encode` builds.

    Uses the tokenizer's character offsets, so a subject that merges with a preceding space
    (``" Paris"``) is still found. ``start``: the subject's character offset in ``prompt``
    (from its template's slot, :func:`fill`); without it the first occurrence counts -- wrong
    when text before the slot (e.g. an editor's context prefix) contains the subject.
    """
    if start is not None:
        if prompt[start : start + len(subject)] != subject:
            raise ValueError(f"subject {subject!r} is not at offset {start} of {prompt!r}")
    else:
        start = prompt.find(subject) if subject else -1
    if start < 0:
        raise ValueError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; give the subject "
            "exactly as it is written in the prompt (case and spacing included)."
        )
    end = start + len(subject)
    enc = lm.tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    hits = [
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a
    ]
    if not hits:  # pragma: no cover - only tokenizers without offsets
        raise ValueError(f"could not map subject {subject!r} to tokens of {prompt!r}")
    off = len(lm.prefix_ids)
    return hits[0] + off, hits[-1] + off


def subject_last(lm, prompt: str, subject: str, start: int | None = None) -> int:
    return subject_span(lm, prompt, subject, start)[1]
