"""Where steamviz finds its own data and the shared evaluation data.

- ``data_dir()``: the project's ``data/`` (edit set, reference facts), override with
  ``$STEAMVIZ_DATA``.
- ``cache_dir()``: everything steamviz computes once and keeps on disk (converted models,
  recall checks, anchors, banks, statistics, the IDF, fetched data), ``$STEAMVIZ_CACHE``,
  default ``~/.cache/steamviz``. In-process caches are in :mod:`steamviz.core.memo`.
- Public evaluation data (CounterFact, MQuAKE, LRE, ParaRel, WikiText) is fetched into the
  cache by :mod:`steamviz.data.fetch` (``steamviz data get NAME``).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: steamviz/core/paths.py -> ../../..


def data_dir() -> Path:
    return Path(os.environ.get("STEAMVIZ_DATA", ROOT / "data"))


def cache_dir() -> Path:
    """Where steamviz keeps converted models and statistics (``$STEAMVIZ_CACHE``)."""
    return Path(os.environ.get("STEAMVIZ_CACHE", Path.home() / ".cache" / "steamviz"))
