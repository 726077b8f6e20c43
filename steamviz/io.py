"""Atomic file writes: a reader never sees a half-written file.

>>> from pathlib import Path; import tempfile
>>> p = Path(tempfile.mkdtemp()) / "x.json"
>>> _ = write_json(p, {"a": 1}); p.read_text()
'{\\n "a": 1\\n}'
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def save_torch(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path``, atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())
