"""Public data sets: where each file comes from, fetched into the cache and checked by sha256.

steamviz reads CounterFact, MQuAKE, zsRE, LRE, ParaRel, Polyglot and WikiText from the
steamviz cache (``$STEAMVIZ_CACHE/data``, laid out like the data mirror). ``sources.json``
beside this file lists every file with its size, sha256 and canonical public URL (a source
repository at a fixed commit).

    steamviz data list                  # what exists, what is here
    steamviz data get counterfact lre   # fetch into the cache

>>> root = get("counterfact")                                       # doctest: +SKIP
>>> root / "counterfact_easyedit" / "counterfact-val.json"         # doctest: +SKIP

Where a file comes from, in order: the cache (verified once, then trusted while its size and
mtime stay); the mirror named by ``$STEAMVIZ_DATA_MIRROR`` -- a folder or an http(s) URL
laid out like the cache, for machines without internet; the public URL. Each download goes
to ``<file>.part``, resumes from there after an interruption (HTTP Range), and becomes the
file only when its sha256 matches (atomic rename); a mismatch is refused and deleted.

Loading data (:func:`path`) never touches the network: it takes the cache or the mirror,
and otherwise says which ``steamviz data get`` to run. Only ``get`` downloads.

A file with no public URL exists only in the mirror. Two of them are conversions of a
published file (``derived`` in ``sources.json``, :mod:`steamviz.data.corpus`): without a
mirror they are made from that file, here, and checked by the same sha256. The others (the
fixed halves of MQuAKE and zsRE) cannot be had without the mirror; ``get`` fetches the rest of
their data set and then names them, and the ``-full`` data set that fetches the whole public
file.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.io import sha256_file

MIRROR_ENV = "STEAMVIZ_DATA_MIRROR"
CHUNK = 1 << 16


class DataError(RuntimeError):
    """A data set that cannot be had: unknown name, not fetched, unreachable, bad checksum."""


class ChecksumError(DataError):
    pass


@dataclass(frozen=True)
class File:
    path: str  # relative to the data root (the mirror's layout)
    size: int
    sha256: str
    url: str | None  # None: only in the steamviz data mirror (a subset or conversion)
    # a conversion of a published file: {"from": its path, "how": steamviz.data.corpus name}
    derived: dict | None = None


@lru_cache(maxsize=1)
def sources() -> dict[str, dict]:
    """``{name: {"description", "license", "files": [File, ...]}}``."""
    raw = json.loads((Path(__file__).parent / "sources.json").read_text())
    return {k: dict(v, files=[File(**f) for f in v["files"]]) for k, v in raw.items()}


def data_root() -> Path:
    """Where fetched data lives: ``$STEAMVIZ_CACHE/data``."""
    from ..core.paths import cache_dir

    return cache_dir() / "data"


def mirror() -> str | None:
    """``$STEAMVIZ_DATA_MIRROR`` (a folder or an http(s) URL), or None."""
    m = os.environ.get(MIRROR_ENV, "").strip()
    return m or None


def _files(name: str) -> list[File]:
    src = sources()
    if name not in src:
        raise DataError(f"unknown data set {name!r}; known: {sorted(src)} (steamviz data list)")
    return src[name]["files"]


def _stamp(p: Path) -> Path:
    return p.with_name(p.name + ".verified")


def _verified(f: File, p: Path) -> bool:
    """``p`` holds ``f``: checked by sha256 once, then by size and mtime (the stamp)."""
    if not p.is_file() or p.stat().st_size != f.size:
        return False
    st = p.stat()
    mark = f"{f.sha256} {st.st_size} {st.st_mtime_ns}"
    stamp = _stamp(p)
    if stamp.is_file() and stamp.read_text() == mark:
        return True
    if sha256_file(p) != f.sha256:
        return False
    stamp.write_text(mark)
    return True


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _download(url: str, part: Path, timeout: float) -> None:
    """Append ``url``'s remaining bytes to ``part`` (resuming with a Range request)."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "steamviz"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # already complete
            return
        raise
    with resp:
        mode = "ab" if have and resp.status == 206 else "wb"  # a 200 starts over
        with open(part, mode) as out:
            shutil.copyfileobj(resp, out, CHUNK)


def _in_mirror_folder(f: File) -> bool:
    """``f`` is in the data mirror and the mirror is a folder (copied without a network)."""
    m = mirror()
    return bool(m) and not _is_url(m) and (Path(m) / f.path).is_file()


def _source_of(f: File) -> File:
    """The published file ``f`` is derived from."""
    for s in sources().values():
        for x in s["files"]:
            if x.path == f.derived["from"]:
                return x
    raise DataError(f"{f.path} is derived from {f.derived['from']}, which no data set lists")


def _derive(f: File, dest: Path, timeout: float | None) -> str:
    """Make ``f`` from its published file (fetched first unless ``timeout`` is None: then
    only a cached or mirror-folder copy is used), check its sha256, rename into place."""
    from .corpus import convert

    src = _source_of(f)
    src_dest = data_root() / src.path
    if not _verified(src, src_dest):
        if timeout is None:
            if not _in_mirror_folder(src):
                raise DataError(f"{f.path} is made from {src.path}, which is not here")
            timeout = 0
        _fetch_one(src, src_dest, timeout)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(convert(f.derived["how"], src_dest))
    got = sha256_file(part)
    if got != f.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{f.path}: made from {src.path} ({f.derived['how']}), it has "
                            f"sha256 {got}, expected {f.sha256}; refused and deleted")
    os.replace(part, dest)
    _verified(f, dest)
    return f"conversion of {src.path}"


def _fetch_one(f: File, dest: Path, timeout: float) -> str:
    """Bring ``f`` to ``dest``; return where it came from. Raises DataError naming every
    source tried and the fix."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    tried = []
    m = mirror()
    candidates = []
    if m:
        candidates.append(("mirror", m.rstrip("/") + "/" + f.path if _is_url(m)
                           else str(Path(m) / f.path)))
    if f.url:
        candidates.append(("public URL", f.url))
    for kind, where in candidates:
        try:
            if _is_url(where):
                _download(where, part, timeout)
            else:
                if not Path(where).is_file():
                    tried.append(f"{kind} {where}: no such file")
                    continue
                shutil.copyfile(where, part)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
            tried.append(f"{kind} {where}: {getattr(e, 'reason', None) or e!r}")
            continue  # a partial .part stays, to resume from
        have = part.stat().st_size if part.exists() else 0
        if have < f.size:  # the transfer stopped early: keep it, to resume from
            tried.append(f"{kind} {where}: interrupted at {have:,} of {f.size:,} bytes "
                         "(run the same command again to resume)")
            continue
        got = sha256_file(part)
        if got != f.sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{f.path}: the {kind} copy ({where}) has sha256 {got}, expected {f.sha256}; "
                "refused and deleted. Is the mirror out of date? Run `steamviz data get` again "
                "once it is fixed.")
        os.replace(part, dest)
        _verified(f, dest)
        return kind
    hint = (f"set {MIRROR_ENV} to a folder or URL holding the steamviz data mirror (same "
            "layout as the cache)")
    if f.derived:
        return _derive(f, dest, timeout)
    if f.url is None:
        raise DataError(f"{f.path} exists only in the steamviz data mirror (no public URL); "
                        f"{hint}. Tried: {'; '.join(tried) or 'no mirror set'}")
    raise DataError(f"could not fetch {f.path}: {'; '.join(tried)}. Without internet, {hint}.")


def get(name: str, timeout: float = 60.0, log=None) -> Path:
    """Fetch every file of data set ``name`` into the cache (see module docstring); returns
    the data root."""
    root = data_root()
    missing = []
    for f in _files(name):
        dest = root / f.path
        if _verified(f, dest):
            continue
        try:
            kind = _fetch_one(f, dest, timeout)
        except ChecksumError:
            raise
        except DataError:
            if f.url is not None or f.derived:
                raise
            missing.append(f.path)  # only in the mirror, which lacks it: fetch the others
            continue
        if log:
            log(f"[steamviz] {f.path}: {f.size / 1e6:.2f} MB from the {kind}")
    if missing:
        full = f"{name}-full"
        alt = (f"; `steamviz data get {full}` fetches the whole public file it was cut from"
               if full in sources() else "")
        where = f"{MIRROR_ENV} ({mirror()}) lacks it" if mirror() else f"set {MIRROR_ENV} to it"
        raise DataError(f"data set {name!r}: {', '.join(missing)} exist(s) only in the steamviz "
                        f"data mirror (no public URL) and {where}; the rest is fetched{alt}")
    return root


def path(name: str, rel: str | None = None) -> Path:
    """The local path of data set ``name`` (its file ``rel``, or the data root), taken from
    the cache or copied from a *folder* mirror -- never downloaded: a missing file raises
    :class:`DataError` naming ``steamviz data get NAME``."""
    files = _files(name)
    want = [f for f in files if rel is None or f.path == rel or f.path.startswith(rel + "/")]
    if not want:
        raise DataError(f"data set {name!r} has no file {rel!r}")
    root = data_root()
    for f in want:
        dest = root / f.path
        if _verified(f, dest):
            continue
        if _in_mirror_folder(f):
            _fetch_one(f, dest, timeout=0)
            continue
        if f.derived:  # made here from its published file, when that is here
            try:
                _derive(f, dest, timeout=None)
                continue
            except ChecksumError:
                raise
            except DataError:
                pass
        size = sum(x.size for x in files) / 1e6
        raise DataError(
            f"data set {name!r} is not here ({f.path} missing). Fetch it once with "
            f"`steamviz data get {name}` ({size:.1f} MB), or set {MIRROR_ENV} to a data "
            "mirror folder.")
    return root / rel if rel else root


def available(name: str) -> str | None:
    """None when data set ``name`` can be loaded here (cached, or in a folder mirror); else
    the reason it cannot."""
    try:
        path(name)
    except DataError as e:
        return str(e)
    return None


def status(name: str) -> str:
    """``"cached"``, ``"in mirror"`` or ``"not fetched"``."""
    root = data_root()
    files = _files(name)
    if all((root / f.path).is_file() and (root / f.path).stat().st_size == f.size
           for f in files):
        return "cached"
    if all(_in_mirror_folder(f) for f in files):
        return "in mirror"
    return "not fetched"


def table() -> list[dict]:
    """One row per data set, for ``steamviz data list``."""
    rows = []
    for name, s in sources().items():
        files = s["files"]
        rows.append(dict(name=name, files=len(files), mb=round(sum(f.size for f in files) / 1e6, 2),
                         mirror_only=sum(f.url is None and not f.derived for f in files), status=status(name),
                         description=s["description"], license=s["license"]))
    return rows
