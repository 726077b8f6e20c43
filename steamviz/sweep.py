"""Sweeps: edit requests x a grid (method, lambda, edited layer, alignment layers), every
metric in one tidy table, resumable.

>>> cfg = SweepConfig(n_edits=10, methods=["rome", "steam-rome"], lams=[5, 20, 50])  # doctest: +SKIP
>>> df = run_sweep(cfg, "runs/lam")        # one row per edit x grid point       # doctest: +SKIP

Results store: ``RUN/points/<key>.json``, one file per finished point, written atomically
(temp file + rename), keyed by a hash of the point's full configuration (model fingerprint,
request, method, hyperparameters, seed). Re-running skips finished points; a run killed at
any moment loses at most the point in flight. ``RUN/config.yaml`` and ``RUN/versions.json``
record what ran. Work shared across grid points is done once: context prompts, keys and the
lower-layer caches (``rome.prepare``), anchors, the reference bank and pre-edit metrics.

Config schema (YAML keys = :class:`SweepConfig` fields; unknown keys are refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import write_json, write_text


class ConfigError(ValueError):
    pass


@dataclass
class SweepConfig:
    """A sweep. ``data``: 'default' (data/edits.jsonl), 'counterfact' (shared val set) or a
    file path. ``align_layers``: list of layer lists, or "default" (mid layers above the
    edited block). ``edit_layers``: None = the model's default ROME layer."""

    model: str | None = None
    device: str = "auto"
    data: str = "default"
    n_edits: int = 10
    offset: int = 0
    methods: list = field(default_factory=lambda: ["rome", "steam-rome"])
    lams: list = field(default_factory=lambda: [20.0])
    edit_layers: list | None = None
    align_layers: list = field(default_factory=lambda: ["default"])
    centered: list = field(default_factory=lambda: [False])
    include_unedited: bool = True
    generation: bool = True
    max_new_tokens: int = 30
    knn_k: int = 10
    bank_size: int | None = None  # reference facts in the kNN / centring bank (None: all)
    seed: int = 0
    hparams: dict = field(default_factory=dict)  # ROME hyperparameter overrides

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        if not isinstance(d, dict):
            raise ConfigError("a sweep config is a mapping of keys to values")
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k in d:
            if k not in names:
                raise ConfigError(f"unknown config key {k!r}; allowed: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "SweepConfig":
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        from .editors import METHODS, _load_builtin

        _load_builtin()

        def need(cond, key, what):
            if not cond:
                raise ConfigError(f"config key {key!r}: {what} (got {getattr(self, key)!r})")

        need(isinstance(self.methods, list) and self.methods, "methods", "a non-empty list")
        for m in self.methods:
            need(str(m).lower() in METHODS, "methods", f"each one of {sorted(METHODS)}")
        need(isinstance(self.lams, list) and all(isinstance(x, (int, float)) for x in self.lams),
             "lams", "a list of numbers")
        need(isinstance(self.n_edits, int) and self.n_edits > 0, "n_edits", "a positive integer")
        need(self.edit_layers is None or (isinstance(self.edit_layers, list) and all(
            isinstance(x, int) for x in self.edit_layers)), "edit_layers", "null or a list of ints")
        need(isinstance(self.align_layers, list) and all(
            x == "default" or (isinstance(x, list) and all(isinstance(i, int) for i in x))
            for x in self.align_layers), "align_layers", 'a list of "default" or lists of ints')
        need(isinstance(self.centered, list) and all(isinstance(x, bool) for x in self.centered),
             "centered", "a list of booleans")
        from .rome import ROMEHparams

        ok = {f.name for f in dataclasses.fields(ROMEHparams)}
        for k in self.hparams:
            need(k in ok, "hparams", f"keys among {sorted(ok)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def grid(cfg: SweepConfig, default_layer: int) -> list[dict]:
    """The grid points (without requests)."""
    pts = []
    layers = cfg.edit_layers or [default_layer]
    if cfg.include_unedited:
        pts.append(dict(method="unedited", layer=None, lam=None, align_layers=None,
                        centered=None))
    for m in cfg.methods:
        m = m.lower()
        for L in layers:
            if m == "steam-rome":
                for lam in cfg.lams:
                    for al in cfg.align_layers:
                        for c in cfg.centered:
                            pts.append(dict(method=m, layer=L, lam=float(lam), align_layers=al,
                                            centered=c))
            else:
                pts.append(dict(method=m, layer=L, lam=None, align_layers=None, centered=None))
    return pts


def point_key(fingerprint: str, request: dict, point: dict, hparams: dict, seed: int,
              extra: dict) -> str:
    blob = json.dumps(dict(model=fingerprint, request=request, point=point, hparams=hparams,
                           seed=seed, **extra), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Store:
    """``RUN/points/<key>.json``: one atomically written file per finished point."""

    def __init__(self, run_dir):
        self.dir = Path(run_dir) / "points"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*"):  # temp files of a write killed mid-way
            stale.unlink(missing_ok=True)

    def has(self, key: str) -> bool:
        return (self.dir / f"{key}.json").exists()

    def put(self, key: str, row: dict) -> None:
        write_json(self.dir / f"{key}.json", dict(row, key=key))

    def rows(self) -> list[dict]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):  # cannot happen with atomic writes; be safe
                continue
        return out

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows())


def _versions() -> dict:
    import platform

    import torch
    import transformers

    from . import __version__

    return dict(steamviz=__version__, torch=torch.__version__,
                transformers=transformers.__version__, numpy=np.__version__,
                python=platform.python_version())


def _jsonable(v: Any):
    if isinstance(v, np.ndarray):
        return [round(float(x), 6) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


class Runner:
    """Holds the model and everything shared across points (see :func:`run_sweep`)."""

    def __init__(self, cfg: SweepConfig, lm=None):
        from .models import load_model
        from .rome import ROMEHparams

        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, device=cfg.device)
        self.hp = ROMEHparams.for_model(self.lm).replace(seed=cfg.seed, **cfg.hparams)
        self._pre: dict = {}
        self._refs: dict = {}
        self._anchors: dict = {}

    def requests(self):
        from .datasets import load_named

        reqs = load_named(self.cfg.data, self.cfg.offset + self.cfg.n_edits)
        return reqs[self.cfg.offset :]

    def bank(self):
        from .anchors import reference_bank

        return reference_bank(self.lm, limit=self.cfg.bank_size, seed=self.cfg.seed)

    def anchor(self, obj: str, subject: str):
        from .anchors import AnchorError, build_anchor

        key = (obj, subject)
        if key not in self._anchors:
            try:
                self._anchors[key] = build_anchor(self.lm, obj, exclude_subjects=(subject,))
            except AnchorError:
                self._anchors[key] = None
        return self._anchors[key]

    def ref_text(self, obj: str):
        from .metrics import reference_text

        if obj not in self._refs:
            self._refs[obj] = reference_text(self.lm, obj)
        return self._refs[obj]

    def align_layers(self, point: dict) -> list[int]:
        from .steam import default_layers

        al = point.get("align_layers") or "default"
        L = point["layer"] if point.get("layer") is not None else self.hp.layer
        return default_layers(self.lm, L) if al == "default" else list(al)

    def keys(self, req, point) -> str:
        extra = dict(gen=self.cfg.generation, tokens=self.cfg.max_new_tokens, k=self.cfg.knn_k)
        if self.cfg.bank_size is not None:
            extra["bank"] = self.cfg.bank_size
        return point_key(self.lm.fingerprint, req.to_dict(), point,
                         self.hp.replace(layer=point["layer"] or self.hp.layer).to_dict(),
                         self.cfg.seed, extra)

    def measure(self, req, point, edit_info: dict | None) -> dict:
        from .integration import integration_rows
        from .metrics import evaluate

        cfg = self.cfg
        ref = self.ref_text(req.target_new) if cfg.generation else None
        row = evaluate(self.lm, req, generation=cfg.generation, ref_text=ref,
                       max_new_tokens=cfg.max_new_tokens)
        anchor = self.anchor(req.target_new, req.subject)
        if anchor is not None:
            old = self.anchor(req.target_true, req.subject) if req.target_true else None
            layers = self.align_layers(point)
            integ = integration_rows(self.lm, req, anchor, self.bank(), layers, old_anchor=old,
                                     k=cfg.knn_k)
            row.update(integ)
            row["anchor_facts"] = anchor.n
        return row

    def run_point(self, req, point) -> dict:
        from .editors import edit

        t0 = time.perf_counter()
        info = {}
        if point["method"] == "unedited":
            row = self.measure(req, point, None)
        else:
            kw = dict(layer=point["layer"], hparams=self.hp)
            if point["method"] == "steam-rome":
                kw.update(lam=point["lam"], layers=self.align_layers(point),
                          centered=point["centered"])
            t = time.perf_counter()
            with edit(self.lm, req, point["method"], **kw) as e:
                info = dict(edit_seconds=time.perf_counter() - t, steps=e.info.get("steps"),
                            final_nll=(e.info.get("losses") or [{}])[-1].get("nll"))
                row = self.measure(req, point, e.info)
        row.update(info)
        row.update({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in point.items()})
        row["relation_id"] = req.relation_id
        row["seconds"] = time.perf_counter() - t0
        return {k: _jsonable(v) for k, v in row.items()}


def run_sweep(cfg: SweepConfig, run_dir, lm=None, progress: bool = True,
              log=print) -> pd.DataFrame:
    """Run every (request, grid point) not yet in ``run_dir``'s store; return all rows."""
    from tqdm.auto import tqdm

    cfg.validate()
    run_dir = Path(run_dir)
    store = Store(run_dir)
    import yaml

    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json(run_dir / "versions.json", _versions())
    runner = Runner(cfg, lm)
    reqs = runner.requests()
    pts = grid(cfg, runner.hp.layer)
    todo = [(r, p) for r in reqs for p in pts]
    keyed = [(runner.keys(r, p), r, p) for r, p in todo]
    left = [(k, r, p) for k, r, p in keyed if not store.has(k)]
    if len(left) < len(keyed):
        log(f"[steamviz] resuming: {len(keyed) - len(left)} of {len(keyed)} points done")
    bar = tqdm(left, desc="sweep", disable=not progress, unit="pt")
    for key, req, point in bar:
        row = runner.run_point(req, point)
        row["case_id"] = req.case_id
        store.put(key, row)
        lam = "" if point["lam"] is None else f" lam={point['lam']:g}"
        log(f"[point] {req.case_id} {point['method']}{lam} L={point['layer']}: "
            f"eff={row.get('efficacy')} para={row.get('paraphrase')} "
            f"nbhd={row.get('neighborhood')} cos_c={_fmt(row.get('cos_centered'))} "
            f"knn={_fmt(row.get('knn_share'))} ({row['seconds']:.1f} s)")
    keys = {k for k, _, _ in keyed}
    df = store.frame()
    return df[df.key.isin(keys)].reset_index(drop=True) if len(df) else df


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per grid point (method, lambda, layer, alignment set, centring)."""
    cols = [c for c in ["efficacy", "paraphrase", "neighborhood", "portability", "fluency",
                        "consistency", "cos_raw", "cos_centered", "knn_share", "axis",
                        "edit_seconds"] if c in df.columns]
    by = ["method", "lam", "layer", "align_layers", "centered"]
    d = df.copy()
    for b in by:
        d[b] = d[b].astype(str)
    return d.groupby(by, sort=False, dropna=False)[cols].mean().round(3).reset_index()
