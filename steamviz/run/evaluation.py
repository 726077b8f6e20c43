"""Evaluate an editor on many requests: metrics before and after each edit, one tidy table.

>>> df = run(lm, requests[:100], method="rome")                    # doctest: +SKIP
>>> summarize(df)                                                   # doctest: +SKIP

Command line: ``steamviz eval --data counterfact --n 100 --method rome --out runs/cf100``.
Each edit is restored before the next one (the model is the unedited model for every case).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..edit.editors import edit as apply_edit
from ..measure.metrics import evaluate
from ..data.requests import EditRequest

HEADLINE = ["efficacy", "paraphrase", "neighborhood", "portability", "fluency", "consistency"]


def run(
    lm,
    requests: Sequence[EditRequest],
    method: str = "rome",
    generation: bool = True,
    ref_texts: dict | None = None,
    progress: bool = True,
    **params,
) -> pd.DataFrame:
    """Rows: one per (request, stage) with stage ``pre`` (unedited) and ``post``."""
    rows = []
    bar = tqdm(requests, desc=method, disable=not progress)
    for req in bar:
        ref = (ref_texts or {}).get(req.target_new)
        pre = evaluate(lm, req, generation=generation, ref_text=ref)
        t = time.perf_counter()
        with apply_edit(lm, req, method, **params) as e:
            secs = time.perf_counter() - t
            post = evaluate(lm, req, generation=generation, ref_text=ref)
            steps = e.info.get("steps")
        for stage, r in (("pre", pre), ("post", post)):
            rows.append(dict(method=method, stage=stage, seconds=secs, steps=steps, **r))
        bar.set_postfix(eff=np.mean([r["efficacy"] for r in rows if r["stage"] == "post"]))
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, cols: Sequence[str] = HEADLINE) -> pd.DataFrame:
    """Mean of each metric by method and stage."""
    cols = [c for c in cols if c in df.columns]
    return df.groupby(["method", "stage"], sort=False, dropna=False)[cols].mean().round(3)


def markdown(df: pd.DataFrame) -> str:
    """A pipe table (no extra dependency), index included."""
    d = df.reset_index()
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, d.columns)) + " |",
             "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines)
