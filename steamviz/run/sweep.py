"""Sweeps: edit requests x a grid (method, lambda, edited block, alignment layers), every
metric in one tidy table, resumable.

>>> cfg = SweepConfig(n_edits=10, methods=["rome", "steam-rome"], lams=[5, 20, 50])  # doctest: +SKIP
>>> df = run_sweep(cfg, "runs/lam")        # one row per edit x grid point       # doctest: +SKIP

Results store: ``RUN/points/<key>.json``, one file per finished point, written atomically
(temp file + rename), keyed by a hash of the point's full configuration (model fingerprint,
request, method, hyperparameters, seed). Re-running skips finished points; a run killed at
any moment loses at most the point in flight. ``RUN/config.yaml`` and ``RUN/versions.json``
record what ran; ``RUN/inputs.json`` the sha256 of the files the config names, so a moved run
folder (the same bytes under another path) resumes. Work shared across grid points is done
once: context prompts, keys and the lower-block caches (``rome.prepare``), anchors, the
reference bank and pre-edit metrics.

Config schema (YAML keys = :class:`SweepConfig` fields; unknown keys are refused).

The parts live in their own modules, re-exported here: :mod:`steamviz.run.plan` (config, grid,
keys), :mod:`steamviz.run.store` (the results store), :mod:`steamviz.run.runner` (the worker) and
:mod:`steamviz.run.executors` (where points run).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pandas as pd

from ..core.io import sha256_file, write_json, write_text
from .plan import (  # noqa: F401 (re-exported: steamviz.run.sweep is the public face)
    ConfigError,
    SweepConfig,
    axes,
    grid,
    point_key,
    request_digest,
    units,
)
from .runner import Runner  # noqa: F401
from .store import Store, StoreBusy, jsonable, versions  # noqa: F401


def _config_change(run_dir: Path, cfg: SweepConfig) -> list[str]:
    """The config keys that differ from the config recorded in ``run_dir`` (none if there
    is no record or no point yet)."""
    import yaml

    old_path = run_dir / "config.yaml"
    if not old_path.exists() or not any((run_dir / "points").glob("*.json")):
        return []
    try:
        old = yaml.safe_load(old_path.read_text()) or {}
    except yaml.YAMLError:
        return ["(unreadable config.yaml)"]
    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # a key the record lacks is a key added to steamviz since: the recorded run used the
    # behaviour of its default
    default = yaml.safe_load(yaml.safe_dump(SweepConfig().to_dict(), sort_keys=False))
    old = SweepConfig.upgrade(old) if isinstance(old, dict) else {}
    old = {**{k: default[k] for k in set(new) - set(old) if k in default}, **old}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    # a file named by another path with the same bytes (the run folder moved, or a claims
    # run resumed elsewhere) is the same input
    files = _read_inputs(run_dir)
    return [k for k in changed if not (k in files and _digest(new.get(k)) == files[k])]


#: config keys that may name a file (a requests file, a facts file, ParaRel patterns)
FILE_KEYS = ("data", "reference_facts", "pararel_patterns")


def _digest(value) -> str | None:
    """sha256 of the file ``value`` names, or None (not a string, or no such file)."""
    if not isinstance(value, str) or not Path(value).is_file():
        return None
    return sha256_file(value)


def _read_inputs(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / "inputs.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_inputs(run_dir: Path, cfg: SweepConfig) -> None:
    """RUN/inputs.json: the sha256 of each file the config names (see _config_change)."""
    files = {k: _digest(getattr(cfg, k)) for k in FILE_KEYS}
    write_json(run_dir / "inputs.json", {k: v for k, v in files.items() if v})


def run_sweep(cfg: SweepConfig, run_dir, lm=None, progress: bool = True,
              log=print, executor: str = "local", force: bool = False,
              **executor_options) -> pd.DataFrame:
    """Run every (request, grid point) not yet in ``run_dir``'s store; return all rows.

    ``executor``: ``"local"`` (this process) or ``"ray"`` (a Ray cluster; ``executor_options``
    such as ``address``, ``workers`` go to :class:`steamviz.run.executors.RayExecutor`).
    A run folder holds the points of one config: a changed config is refused (before any
    work) unless ``force``, which adds its points to the folder and keeps every config in
    ``RUN/config-history/``."""
    from .executors import make_executor

    from ..core.models import model_depth

    depth = getattr(lm, "n_blocks", None) if lm is not None else model_depth(cfg.model)
    cfg.validate(depth)  # block indices too, before any load
    _check_data(cfg)
    run_dir = Path(run_dir)
    changed = _config_change(run_dir, cfg)
    if changed and not force:
        raise ConfigError(
            f"{run_dir} holds points of another config (changed: {', '.join(changed)}); write "
            "to another folder, or pass force=True (--force) to add this config's points to it")
    ex = make_executor(executor, cfg, lm=lm, log=log, vstar_dir=run_dir / "vstar",
                       **executor_options)  # fails before any work
    try:
        store = Store(run_dir, writer=True)
    except StoreBusy:
        ex.close()
        raise
    import yaml

    try:
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        write_text(run_dir / "config.yaml", text)
        hist = run_dir / "config-history"
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        if not (hist / f"{digest}.yaml").exists():
            write_text(hist / f"{digest}.yaml", text)
        write_json(run_dir / "versions.json", versions())
        _write_inputs(run_dir, cfg)
        moved = store.quarantine()
        if moved:
            log(f"[steamviz] {len(moved)} point file(s) could not be read; moved to "
                f"{moved[0].parent} and computed again")
        work = ex.plan()  # [(keys, requests edited together, point)]
        left = [w for w in work if not all(store.has(k) for k in w[0])]
        n_all, n_left = sum(len(w[0]) for w in work), sum(len(w[0]) for w in left)
        if n_left < n_all:
            log(f"[steamviz] resuming: {n_all - n_left} of {n_all} points done")
        bar = _progress_bar(n_all, n_left, progress)

        def done(keys, batch, point, rows):  # only this process writes the store
            for key, req, row in zip(keys, batch, rows):
                row["case_id"] = req.case_id
                row["request_digest"] = request_digest(req.to_dict())
                store.put(key, row)
                _log_row(log, req, point, row)
            bar.update(len(rows))

        ex.run(left, done)
        bar.close()
    finally:
        ex.close()
        store.close()
    return in_plan_order(store.rows(), [k for w in work for k in w[0]])


def in_plan_order(rows: list[dict], keys: list) -> pd.DataFrame:
    """The stored ``rows`` whose ``key`` is in ``keys``, as a frame in the order of ``keys``
    (the plan's: request by request, grid point by grid point). Not the store's file order,
    which follows the keys' hashes: the frame's row order and its column order (pandas takes
    the columns in order of first appearance) then depend only on the plan, not on what the
    keys hash (the model, the references, the data at hand).

    >>> rows = [dict(key="b", v=2, late=0), dict(key="x", v=0), dict(key="a", v=1)]
    >>> df = in_plan_order(rows, ["a", "b"])
    >>> df.v.tolist(), list(df.columns)
    ([1, 2], ['key', 'v', 'late'])
    """
    rank = {k: i for i, k in enumerate(keys)}
    return pd.DataFrame(sorted((r for r in rows if r.get("key") in rank),
                               key=lambda r: rank[r["key"]]))


def _progress_bar(n_all: int, n_left: int, progress: bool = True):
    """The sweep's progress bar over all ``n_all`` points, starting at the ones already in
    the store: a resumed sweep shows "resumed: 6 of 6 points done ... 6/6" (not "0/0"), a
    partly resumed one starts at "2/6"."""
    from tqdm.auto import tqdm

    done = n_all - n_left
    if not done:
        desc = "sweep"
    elif not n_left:
        desc = f"resumed: {done} of {n_all} points done"
    else:
        desc = f"sweep (resumed: {done} of {n_all} points done before)"
    return tqdm(total=n_all, initial=done, desc=desc, disable=not progress, unit="edit")


def _check_data(cfg: SweepConfig) -> None:
    """Read the config's requests once before any write or model load: a missing or
    malformed data file is a :class:`ConfigError` naming the key."""
    from ..data.datasets import load_named
    from ..data.fetch import DataError
    from ..data.requests import RequestError

    try:
        reqs = load_named(cfg.data, cfg.offset + cfg.n_edits)
    except (DataError, RequestError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'data': {e}") from None
    if len(reqs) <= cfg.offset:
        raise ConfigError(f"config key 'offset': {cfg.offset} skips every one of the "
                          f"{len(reqs)} requests in {cfg.data!r}")
    seen = Counter(r.case_id for r in reqs[cfg.offset:] if r.case_id is not None)
    twice = [i for i, n in seen.items() if n > 1]
    if twice:  # rows are paired by case id: two requests under one id mix their rows
        raise ConfigError(
            f"config key 'data': case ids repeat in {cfg.data!r}: "
            f"{', '.join(map(repr, twice[:5]))}{' ...' if len(twice) > 5 else ''}; summaries "
            "pair rows by case id, so give each request its own case_id (data sets merged "
            "into one file: prefix the ids, e.g. 'zsre:452')")


def _log_row(log, req, point, row) -> None:
    lam = "" if point["lam"] is None else f" lam={point['lam']:g}"
    b = f" batch={point['batch']}" if point.get("batch") else ""
    log(f"[point] {req.case_id} {point['method']}{lam}{b} block={point['block']}: "
        f"eff={_fmt(row.get('efficacy'))} para={_fmt(row.get('paraphrase'))} "
        f"nbhd={_fmt(row.get('neighborhood'))} cos_c={_fmt(row.get('cos_centered'))} "
        f"knn={_fmt(row.get('knn_share'))} ({row['seconds']:.1f} s)")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per grid point (method, lambda, block, alignment set, centring, batch).
    Integration columns are held out (paraphrases); ``*_trained`` is the rewrite prompt and
    ``*_control`` the same measurement against other objects' anchors. For paired
    differences with confidence intervals use :func:`steamviz.measure.compare.paired`."""
    cols = [c for c in ["efficacy", "paraphrase", "neighborhood", "portability", "fluency",
                        "consistency", "cos_raw", "cos_centered", "cos_centered_control",
                        "cos_centered_trained", "knn_share", "axis", "steps", "final_nll",
                        "edit_seconds"] if c in df.columns]
    by = ["method", "lam", "block", "align_layers", "centered"]
    d = df.copy()
    if "batch" in d.columns:
        by.append("batch")  # anchor seeds are averaged over, as edits are
    for b in by:
        d[b] = d[b].astype(str)
    return d.groupby(by, sort=False, dropna=False)[cols].mean().round(3).reset_index()
