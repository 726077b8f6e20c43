"""Where steamviz finds its own data and the shared evaluation data.

- ``data_dir()``: the project's ``data/`` (edit set, reference facts), override with
  ``$STEAMVIZ_DATA``.
- ``shared_data_dir()``: public evaluation data (CounterFact, MQuAKE, LRE, ParaRel, WikiText)
  in ``../shared/data`` beside the checkout, override with ``$STEAMVIZ_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("STEAMVIZ_DATA", ROOT / "data"))


def shared_data_dir(required: bool = True) -> Path | None:
    env = os.environ.get("STEAMVIZ_SHARED_DATA")
    cands = [Path(env)] if env else [ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in cands:
        if c.is_dir():
            return c
    if required:
        raise FileNotFoundError(
            f"shared evaluation data not found (looked in {[str(c) for c in cands]}); "
            "set STEAMVIZ_SHARED_DATA to the folder holding counterfact_easyedit/, mquake/, ..."
        )
    return None
