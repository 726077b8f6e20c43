"""Atomic file writes: a reader never sees a half-written file.

>>> from pathlib import Path; import tempfile
>>> p = Path(tempfile.mkdtemp()) / "x.json"
>>> _ = write_json(p, {"a": 1}); p.read_text()
'{\\n "a": 1\\n}'
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


def save_tensors(path: str | os.PathLike, tensors: dict, meta: dict) -> Path:
    """Tensors as safetensors with JSON-able ``meta`` in its header, atomically. Read back
    with :func:`load_tensors`: no pickle, so a cache file cannot run code when loaded."""
    from safetensors.torch import save

    blob = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_bytes(path, save(blob, metadata={"steamviz": json.dumps(meta, default=str)}))


def load_tensors(path: str | os.PathLike, expect: dict | None = None) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a :func:`save_tensors` file. ``expect``: ``{name: shape}``
    that must match (a shape entry of None matches any size on that axis). Raises
    ``ValueError`` naming the file when it is not such a file or does not match."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("steamviz")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw) if raw is not None else None
    except Exception as e:  # truncated, not safetensors, bad JSON
        raise ValueError(f"{path}: not a steamviz tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: no steamviz metadata in the header")
    for name, shape in (expect or {}).items():
        t = tensors.get(name)
        ok = t is not None and t.dim() == len(shape) and all(
            s is None or s == n for s, n in zip(shape, t.shape))
        if not ok:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"{path}: tensor {name!r} has shape {got}, expected {shape}")
    return tensors, meta
