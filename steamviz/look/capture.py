"""Residual-stream capture at named token positions.

Layer numbering follows HuggingFace's ``output_hidden_states``: layer 0 is the stream that
enters the first block (embeddings), layer ``l`` is the output of block ``l - 1``. The last
layer is the *pre*-norm stream (HF applies the final norm to its last hidden state; put a
captured last-layer vector through :func:`steamviz.core.arch.final_readout` to get logits).

>>> cap = capture(lm, ["The capital of France is"], subjects=["France"],
...               positions=("last", "subject_last"))          # doctest: +SKIP
>>> cap.tensor.shape          # [prompt, layer, position, hidden]   # doctest: +SKIP
torch.Size([1, 31, 2, 576])
>>> cap.frame().columns.tolist()[:4]                           # doctest: +SKIP
['prompt', 'subject', 'layer', 'position']

The subject positions come from the subject's character offset in each prompt
(``subject_starts``, e.g. from :func:`steamviz.core.tokens.fill`, where the template's ``{}`` slot
was); without it, from the first occurrence of the subject's text, which is wrong when text
before the slot names the subject (``"Toronto is big. {} is in"``):

>>> text, at = fill("Toronto is big. {} is in", "Toronto")            # doctest: +SKIP
>>> capture(lm, [text], positions=("subject_last",), subjects=["Toronto"],
...         subject_starts=[at])                                   # doctest: +SKIP

Hooks are registered inside a context manager and always removed, also on error; the same
model object can be captured before and after an edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..core.hooks import hooks, read, stream  # noqa: F401 (hooks: re-exported)
from ..core.tokens import encode, subject_span

POSITIONS = ("last", "subject_last", "subject_first")


@dataclass
class Capture:
    """Residual streams ``tensor[prompt, layer, position, hidden]`` with their labels."""

    tensor: torch.Tensor
    prompts: list[str]
    subjects: list[str | None]
    layers: list[int]
    positions: list[str]
    token_index: torch.Tensor = field(repr=False)  # [prompt, position] index in the sequence

    def get(self, position: str = "last", layer: int | None = None) -> torch.Tensor:
        """``[prompt, layer, hidden]`` at one position, or ``[prompt, hidden]`` at one layer."""
        t = self.tensor[:, :, self.positions.index(position)]
        if layer is None:
            return t
        return t[:, self.layers.index(layer)]

    def numpy(self) -> np.ndarray:
        return self.tensor.float().cpu().numpy()

    def frame(self):
        """Tidy pandas frame: one row per (prompt, layer, position), ``hidden`` as arrays."""
        import pandas as pd

        P, L, K, _ = self.tensor.shape
        arr = self.numpy()
        rows = []
        for i in range(P):
            for j in range(L):
                for k in range(K):
                    rows.append(
                        dict(
                            prompt=self.prompts[i],
                            subject=self.subjects[i],
                            layer=self.layers[j],
                            position=self.positions[k],
                            token_index=int(self.token_index[i, k]),
                            hidden=arr[i, j, k],
                        )
                    )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (
            f"Capture(prompts={len(self.prompts)}, layers={self.layers[0]}..{self.layers[-1]} "
            f"({len(self.layers)}), positions={self.positions}, shape={tuple(self.tensor.shape)})"
        )


def position_indices(lm, prompts, subjects, positions, lengths, subject_starts=None
                     ) -> torch.Tensor:
    """``[prompt, position]`` token indices for named positions. ``subject_starts``: each
    subject's character offset in its prompt (``None`` for a prompt, or for all: the first
    occurrence of the subject's text; see :func:`capture`)."""
    idx = torch.zeros((len(prompts), len(positions)), dtype=torch.long)
    for i, p in enumerate(prompts):
        start = None if subject_starts is None else subject_starts[i]
        span = None
        for k, name in enumerate(positions):
            if name == "last":
                idx[i, k] = int(lengths[i]) - 1
            elif name in ("subject_last", "subject_first"):
                if subjects is None or subjects[i] is None:
                    raise ValueError(f"position {name!r} needs a subject for prompt {p!r}")
                span = span or subject_span(lm, p, subjects[i], start)
                idx[i, k] = span[1] if name == "subject_last" else span[0]
            else:
                raise ValueError(f"unknown position {name!r}; choose from {POSITIONS}")
    return idx


@torch.no_grad()
def capture(
    lm,
    prompts: Sequence[str],
    positions: Sequence[str] = ("last",),
    layers: Sequence[int] | None = None,
    subjects: Sequence[str] | None = None,
    batch_size: int = 32,
    subject_starts: Sequence[int | None] | None = None,
) -> Capture:
    """Run ``prompts`` and return the residual stream at ``layers`` x ``positions``.

    ``layers``: indices in ``0..n_blocks`` (default all, ``n_blocks + 1`` of them).
    ``positions``: names from :data:`POSITIONS`. ``subjects``: one per prompt, needed for
    the ``subject_*`` positions. ``subject_starts``: one per prompt, the subject's character
    offset in it -- where its template's ``{}`` slot was (:func:`steamviz.core.tokens.fill`); pass
    it whenever the prompts come from templates. Without it (or for a ``None`` entry) the
    subject is searched for and its first occurrence counts, which is wrong when text before
    the slot (a context prefix, a preamble) names the subject too; a search is the only option
    for prompts written without a template. An offset where the subject's text is not raises
    ``ValueError``. Batched with right padding; the forward pass stops after
    the last requested layer and never computes logits.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(subjects, str):
        subjects = [subjects]
    if subjects is not None and len(subjects) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(subjects)} subjects")
    if isinstance(subject_starts, int):
        subject_starts = [subject_starts]
    if subject_starts is not None:
        if subjects is None:
            raise ValueError("subject_starts needs subjects (the subject at each offset)")
        if len(subject_starts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(subject_starts)} "
                             "subject_starts")
    n = lm.n_blocks
    layers = list(range(n + 1)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x <= n]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{n}")
    positions = [positions] if isinstance(positions, str) else list(positions)
    want = sorted(set(layers))
    chunks, index_chunks = [], []
    for s in range(0, len(prompts), batch_size):
        ps = prompts[s : s + batch_size]
        ss = None if subjects is None else list(subjects[s : s + batch_size])
        st = None if subject_starts is None else list(subject_starts[s : s + batch_size])
        batch = encode(lm, ps)
        idx = position_indices(lm, ps, ss, positions, batch.lengths, st)
        gather = idx.to(lm.device)
        rows = torch.arange(len(ps), device=lm.device)[:, None]
        taps = {x: stream(lm, x, keep=lambda h, r=rows, g=gather: h[r, g]) for x in want}  # [b, pos, d]
        got, _ = read(lm, batch.input_ids, batch.attention_mask, taps)
        chunks.append(torch.stack([got[x] for x in layers], dim=1))
        index_chunks.append(idx)
    return Capture(
        tensor=torch.cat(chunks),
        prompts=prompts,
        subjects=list(subjects) if subjects is not None else [None] * len(prompts),
        layers=layers,
        positions=positions,
        token_index=torch.cat(index_chunks),
    )
