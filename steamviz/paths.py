"""Where steamviz finds its own data and the shared evaluation data.

- ``data_dir()``: the project's ``data/`` (edit set, reference facts), override with
  ``$STEAMVIZ_DATA``.
- Public evaluation data (CounterFact, MQuAKE, LRE, ParaRel, WikiText) is fetched into the
  cache by :mod:`steamviz.fetch` (``steamviz data get NAME``).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("STEAMVIZ_DATA", ROOT / "data"))
