"""A sweep's results store: ``RUN/points/<key>.json``, one atomically written file per
finished point, a lock so that one writer holds a run folder, and the versions that ran.

>>> Store(Path("runs/lam")).frame()          # every finished point, one row per edit # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.io import write_json


class StoreBusy(RuntimeError):
    """Another process is writing to this run folder."""


class Store:
    """``RUN/points/<key>.json``: one atomically written file per finished point.

    A writer (``writer=True``, what :func:`run_sweep` opens) holds ``RUN/.lock`` until
    :meth:`close`, so two sweeps never write one folder (the second gets :class:`StoreBusy`),
    and only the lock holder removes temp files of writes killed mid-way. A point file that
    does not parse, or names another key, does not count as done: :meth:`quarantine` moves it
    to ``RUN/points-corrupt/`` so it is recomputed, and :meth:`rows` never drops one silently.
    """

    def __init__(self, run_dir, writer: bool = False):
        self.run = Path(run_dir)
        self.dir = self.run / "points"
        self._lock = None
        self._ok: set[str] = set()
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = _flock(self.run / ".lock")
            for stale in self.dir.glob(".*"):  # temp files of a write killed mid-way
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _read(self, p: Path) -> dict | None:
        try:
            row = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return row if isinstance(row, dict) and row.get("key") == p.stem else None

    def has(self, key: str) -> bool:
        if key in self._ok:
            return True
        p = self.dir / f"{key}.json"
        if p.exists() and self._read(p) is not None:
            self._ok.add(key)
            return True
        return False

    def put(self, key: str, row: dict) -> None:
        write_json(self.dir / f"{key}.json", dict(row, key=key))
        self._ok.add(key)

    def quarantine(self) -> list[Path]:
        """Move every point file that does not parse (or names another key) to
        ``RUN/points-corrupt/``; return where they went."""
        moved = []
        for p in sorted(self.dir.glob("*.json")):
            if self._read(p) is None:
                dest = self.run / "points-corrupt" / f"{p.stem}.{int(time.time())}.json"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, dest)
                moved.append(dest)
        return moved

    def rows(self) -> list[dict]:
        out, bad = [], []
        for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            row = self._read(p)
            if row is None:
                bad.append(p.name)
            else:
                if "layer" in row and "block" not in row:  # written before the rename
                    row["block"] = row.pop("layer")
                out.append(row)
        if bad:
            import warnings

            warnings.warn(f"{len(bad)} point file(s) in {self.dir} cannot be read and are left "
                          f"out ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); run the "
                          "sweep again to move them aside and recompute them", stacklevel=2)
        return out

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows())


def _flock(path: Path):
    """An exclusive, non-blocking flock on ``path`` (held while the file stays open)."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise StoreBusy(f"run folder {path.parent} is in use by {who}; wait for that sweep to "
                        "finish, or write to another folder (--out)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def versions() -> dict:
    import platform

    import torch
    import transformers

    from .. import __version__

    return dict(steamviz=__version__, torch=torch.__version__,
                transformers=transformers.__version__, numpy=np.__version__,
                python=platform.python_version())


def jsonable(v: Any):
    if isinstance(v, np.ndarray):
        return [round(float(x), 6) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


