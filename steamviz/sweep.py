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
import os
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
    # anchor-sampling seeds (a grid axis of every point; null: [seed]). Each seed samples
    # other reference facts into each anchor; ROME's own v* is computed once and reused.
    anchor_seeds: list | None = None
    # False: every v*-optimising method runs exactly hparams.v_num_grad_steps steps (a
    # matched budget: STEAM's extra term buys it no extra steps). True: each stops early on
    # ROME's own terms (NLL + KL + decay < early_stop_loss).
    early_stop: bool = False
    # candidate facts for anchors, controls and the bank: "project" (data/reference_facts
    # .jsonl), "pool" (those plus LRE, ParaRel, Polyglot: steamviz.pool), or a facts file
    # (JSON lines) added to the pool
    reference_facts: str = "project"
    # which reference facts count as known (steamviz.anchors.recall_rule_ok): "greedy" (the
    # model generates the object) or "topK" (its first token among the K likeliest)
    recall_rule: str = "greedy"
    # objects of the requests short of an anchor get up to this many candidate facts per
    # relation (steamviz.pool.widen; each one a recall check on the unedited model); 0: off
    widen_to: int = 400
    # the ParaRel pattern per relation in the pool: "first" (the file's first usable one),
    # "best" (the one the unedited model completes best on subjects this run does not
    # evaluate: steamviz.pool.choose_patterns), or a JSON file {relation: template}
    pararel_patterns: str = "first"
    hparams: dict = field(default_factory=dict)  # ROME hyperparameter overrides
    batch_sizes: list = field(default_factory=lambda: [1])  # for batch editors (MEMIT)
    method_params: dict = field(default_factory=dict)  # {method: {param: value}}

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

    def validate(self, n_layers: int | None = None) -> None:
        """Refuse a bad value naming its key (:class:`ConfigError`). With ``n_layers`` (the
        model's depth, :func:`steamviz.models.model_depth`), block indices are checked too."""
        from .editors import METHODS, _load_builtin, check_params

        _load_builtin()

        def need(cond, key, what):
            if not cond:
                raise ConfigError(f"config key {key!r}: {what} (got {getattr(self, key)!r})")

        need(isinstance(self.methods, list) and self.methods, "methods", "a non-empty list")
        for m in self.methods:
            need(str(m).lower() in METHODS, "methods", f"each one of {sorted(METHODS)}")
        need(isinstance(self.lams, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
            for x in self.lams), "lams", "a list of numbers >= 0")
        need(isinstance(self.n_edits, int) and self.n_edits > 0, "n_edits", "a positive integer")
        need(self.edit_layers is None or (isinstance(self.edit_layers, list) and all(
            isinstance(x, int) for x in self.edit_layers)), "edit_layers", "null or a list of ints")
        need(isinstance(self.align_layers, list) and all(
            x == "default" or (isinstance(x, list) and all(isinstance(i, int) for i in x))
            for x in self.align_layers), "align_layers", 'a list of "default" or lists of ints')
        need(isinstance(self.centered, list) and all(isinstance(x, bool) for x in self.centered),
             "centered", "a list of booleans")
        need(isinstance(self.early_stop, bool), "early_stop", "true or false")
        need(self.anchor_seeds is None or (isinstance(self.anchor_seeds, list) and self.anchor_seeds
             and all(isinstance(x, int) and not isinstance(x, bool) for x in self.anchor_seeds)
             and len(set(self.anchor_seeds)) == len(self.anchor_seeds)),
             "anchor_seeds", "null or a non-empty list of distinct integers")
        need(isinstance(self.reference_facts, str) and (
            self.reference_facts in ("project", "pool") or Path(self.reference_facts).is_file()),
            "reference_facts", '"project", "pool" or the path of a facts file (JSON lines)')
        from .anchors import recall_rule_ok

        need(recall_rule_ok(self.recall_rule) is None, "recall_rule", '"greedy" or "topK" (K >= 1)')
        need(isinstance(self.widen_to, int) and not isinstance(self.widen_to, bool)
             and self.widen_to >= 0, "widen_to", "a non-negative integer (0: no widening)")
        need(isinstance(self.pararel_patterns, str) and (
            self.pararel_patterns in ("first", "best") or Path(self.pararel_patterns).is_file()),
            "pararel_patterns", '"first", "best" or the path of a JSON file {relation: template}')
        need(isinstance(self.batch_sizes, list) and self.batch_sizes and all(
            isinstance(x, int) and x > 0 for x in self.batch_sizes), "batch_sizes",
            "a non-empty list of positive integers")
        need(isinstance(self.method_params, dict) and all(
            str(k).lower() in METHODS and isinstance(v, dict)
            for k, v in self.method_params.items()), "method_params",
            f"a mapping of method (one of {sorted(METHODS)}) to a mapping of parameters")
        for key, typ, least in (("offset", int, 0), ("knn_k", int, 1), ("max_new_tokens", int, 1),
                                ("seed", int, None)):
            v = getattr(self, key)
            need(isinstance(v, typ) and not isinstance(v, bool) and (least is None or v >= least),
                 key, f"an integer{'' if least is None else f' >= {least}'}")
        need(self.bank_size is None or (isinstance(self.bank_size, int) and not isinstance(
            self.bank_size, bool) and self.bank_size >= 1), "bank_size", "null or an integer >= 1")
        for key in ("generation", "include_unedited"):
            need(isinstance(getattr(self, key), bool), key, "true or false")
        need(isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")),
            "device", '"auto", "cpu", "cuda", "cuda:N" or "mps"')
        top = "" if n_layers is None else f" and < {n_layers} (the model's blocks)"
        need(all(0 <= x < (n_layers or 10**9) for x in self.edit_layers or []), "edit_layers",
             f"block indices >= 0{top}")
        need(all(x == "default" or all(0 <= i < (n_layers or 10**9) for i in x)
                 for x in self.align_layers), "align_layers", f"block indices >= 0{top}")
        need(isinstance(self.hparams, dict), "hparams", "a mapping of ROME hyperparameters")
        why = check_params("rome", self.hparams, n_layers)
        need(why is None, "hparams", why)
        for m, params in self.method_params.items():
            why = check_params(str(m), params, n_layers)
            need(why is None, "method_params", f"{m}: {why}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def seeds(self) -> list[int]:
        """The anchor-sampling seeds of the grid."""
        return list(self.anchor_seeds) if self.anchor_seeds is not None else [self.seed]


def axes(method: str) -> tuple[str, ...]:
    """The grid axes of ``method`` -- ``layer`` (edited block), ``lam`` (alignment strength,
    alignment layers, centring), ``batch`` (requests edited at once) -- as registered
    (:func:`steamviz.editors.spec`); the ``unedited`` point has none."""
    from .editors import spec

    return () if str(method).lower() == "unedited" else spec(method).axes


def grid(cfg: SweepConfig, default_layer: int) -> list[dict]:
    """The grid points (without requests).

    Each point holds ``method, layer, lam, align_layers, centered``; points of batch
    editors also hold ``batch`` (the number of requests edited at once); with
    ``anchor_seeds``, every point also holds ``anchor_seed``.
    """
    pts = []
    layers = cfg.edit_layers or [default_layer]
    if cfg.include_unedited:
        pts.append(dict(method="unedited", layer=None, lam=None, align_layers=None,
                        centered=None))
    for m in cfg.methods:
        m = m.lower()
        has = axes(m)
        batches = cfg.batch_sizes if "batch" in has else [None]
        for b in batches:
            for L in layers if "layer" in has else [None]:
                if "lam" in has:
                    steam = [(float(lam), al, c) for lam in cfg.lams for al in cfg.align_layers
                             for c in cfg.centered]
                else:
                    steam = [(None, None, None)]
                for lam, al, c in steam:
                    pt = dict(method=m, layer=L, lam=lam, align_layers=al, centered=c)
                    if b is not None:
                        pt["batch"] = int(b)
                    pts.append(pt)
    if cfg.anchor_seeds is None:  # one seed: points keep their keys of before the axis
        return pts
    return [dict(p, anchor_seed=s) for s in cfg.seeds for p in pts]


def units(requests: list, points: list[dict]) -> list[tuple[list, dict]]:
    """Work units: ``(requests edited together, point)``. Batch points chunk the request
    list into consecutive batches of ``point["batch"]``; every other point is one request."""
    out = []
    for p in points:
        b = p.get("batch")
        if b is None:
            out += [([r], p) for r in requests]
        else:
            out += [(requests[i : i + b], p) for i in range(0, len(requests), b)]
    return out


def point_key(fingerprint: str, request: dict, point: dict, hparams: dict, seed: int,
              extra: dict) -> str:
    blob = json.dumps(dict(model=fingerprint, request=request, point=point, hparams=hparams,
                           seed=seed, **extra), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


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
            self._lock = _lock(self.run / ".lock")
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
                out.append(row)
        if bad:
            import warnings

            warnings.warn(f"{len(bad)} point file(s) in {self.dir} cannot be read and are left "
                          f"out ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); run the "
                          "sweep again to move them aside and recompute them", stacklevel=2)
        return out

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows())


def _lock(path: Path):
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
        cfg.validate(self.lm.n_layers)  # block indices (a model whose config was not readable)
        budget = {} if cfg.early_stop else {"early_stop_loss": 0.0}  # matched: fixed steps
        self.hp = ROMEHparams.for_model(self.lm).replace(**{"seed": cfg.seed, **budget,
                                                            **cfg.hparams})
        self._references = None
        self._prefetched: set = set()  # (request, layer) whose target vectors are computed

    def requests(self):
        from .datasets import load_named

        reqs = load_named(self.cfg.data, self.cfg.offset + self.cfg.n_edits)
        return reqs[self.cfg.offset :]

    def references(self):
        """Every anchor, the bank and the reference texts of this run, built from the
        unedited model on first use -- which :func:`steamviz.executors.plan` makes happen
        before any edit (the builders refuse an edited model)."""
        if self._references is None:
            from .references import build_references

            facts = None
            if self.cfg.reference_facts != "project":
                from .pool import load_pool

                extra = None if self.cfg.reference_facts == "pool" else self.cfg.reference_facts
                facts = load_pool(extra=extra, pararel_templates=self.pararel_templates())
            self._references = build_references(
                self.lm, self.requests(), seeds=self.cfg.seeds, bank_size=self.cfg.bank_size,
                bank_seed=self.cfg.seed, texts=self.cfg.generation, facts=facts,
                widen_to=self.cfg.widen_to, anchor_kw=({} if self.cfg.recall_rule == "greedy"
                           else {"recall_rule": self.cfg.recall_rule}))
        return self._references

    def pararel_templates(self) -> dict | None:
        """The pool's ParaRel template per relation (config key ``pararel_patterns``)."""
        pp = self.cfg.pararel_patterns
        if pp == "first":
            return None
        if pp == "best":
            from .pool import best_templates

            return best_templates(self.lm, {r.subject for r in self.requests()},
                                  self.cfg.recall_rule)
        return {str(k): str(v) for k, v in json.loads(Path(pp).read_text()).items()}

    def bank(self):
        return self.references().bank

    def anchor(self, obj: str, seed: int | None = None):
        return self.references().anchor(obj, self.cfg.seed if seed is None else seed)

    def missing_anchor(self, obj: str, seed: int | None = None) -> str | None:
        """Why ``obj`` has no anchor (None when it has one)."""
        return self.references().missing.get((obj, self.cfg.seed if seed is None else seed))

    def align_layers(self, point: dict) -> list[int]:
        from .steam import default_layers

        al = point.get("align_layers") or "default"
        L = point["layer"] if point.get("layer") is not None else self.hp.layer
        return default_layers(self.lm, L) if al == "default" else list(al)

    def keys(self, req, point, batch: list | None = None) -> str:
        extra = dict(gen=self.cfg.generation, tokens=self.cfg.max_new_tokens, k=self.cfg.knn_k,
                     refs=self.references().digest)
        if self.cfg.generation:  # consistency's TF-IDF weights (#18.5: fitted on WikiText)
            extra["consistency"] = "wikitext-idf"
        if self.cfg.bank_size is not None:
            extra["bank"] = self.cfg.bank_size
        if point.get("batch") is not None:  # a batch edit's row depends on its co-edits
            extra["batch_members"] = [r.case_id for r in batch or [req]]
        params = self.cfg.method_params.get(point["method"]) or {}
        if params:
            extra["method_params"] = params
        return point_key(self.lm.fingerprint, req.to_dict(), point,
                         self.hp.replace(layer=point["layer"] or self.hp.layer).to_dict(),
                         self.cfg.seed, extra)

    def measure(self, req, point, edit_info: dict | None) -> dict:
        """Every metric of ``req`` on the model as it is now. Integration columns are
        measured against references built before any edit; without an anchor for the new
        object, ``anchor_missing`` says why and they are absent."""
        from .integration import integration_rows
        from .metrics import evaluate

        cfg = self.cfg
        refs = self.references()
        ref = refs.text(req.target_new) if cfg.generation else None
        row = evaluate(self.lm, req, generation=cfg.generation, ref_text=ref,
                       max_new_tokens=cfg.max_new_tokens)
        seed = point.get("anchor_seed", cfg.seed)
        anchor = self.anchor(req.target_new, seed)
        if anchor is None:
            row["anchor_missing"] = self.missing_anchor(req.target_new, seed)
            return row
        old = self.anchor(req.target_true, seed) if req.target_true else None
        controls = refs.controls(req.target_new, seed)
        integ = integration_rows(self.lm, req, anchor, refs.bank, self.align_layers(point),
                                 old_anchor=old, k=cfg.knn_k, controls=controls)
        row.update(integ)
        row["anchor_facts"] = anchor.n
        row["control_objects"] = len(controls)
        return row

    def edit_kwargs(self, point, reqs: list | None = None) -> dict:
        """Keyword arguments of :func:`steamviz.editors.edit` (or ``edit_batch``) for a grid
        point; STEAM methods get the run's anchors and bank (built before any edit)."""
        m = point["method"]
        kw = dict(self.cfg.method_params.get(m) or {})
        has = axes(m)
        if "layer" in has:
            kw.update(layer=point["layer"], hparams=self.hp)
        if "lam" in has:
            kw.update(lam=point["lam"], layers=self.align_layers(point),
                      centered=point["centered"], bank=self.bank())
            seed = point.get("anchor_seed")
            anchors = {r.target_new: self.anchor(r.target_new, seed) for r in reqs or []}
            if "batch" in has:
                kw["anchors"] = anchors
            elif reqs:
                kw["anchor"] = anchors[reqs[0].target_new]
        return kw

    def skipped(self, reqs: list, point) -> str | None:
        """Why this unit cannot run (a STEAM point whose new object has no anchor), or None."""
        if "lam" not in axes(point["method"]):
            return None
        seed = point.get("anchor_seed")
        why = [f"{r.target_new!r}: {self.missing_anchor(r.target_new, seed)}" for r in reqs
               if self.anchor(r.target_new, seed) is None]
        return "no anchor for " + "; ".join(why) if why else None

    def prefetch(self, req, point) -> None:
        """Optimise together the target vectors of every ROME / STEAM-ROME point of the grid
        for ``req`` at ``point``'s edit layer (lambdas, alignment sets, centring, anchor
        seeds and plain ROME: :func:`steamviz.rome.compute_vs`), once per request and layer;
        the edits then read them from ROME's cache. The group is always the whole grid's, so
        a resumed run, a Ray worker and a fresh run compute the same vectors."""
        from . import rome
        from .editors import edit

        if point["method"] not in ("rome", "steam-rome") or point.get("batch") is not None:
            return
        mark = (req.case_id, req.subject, req.target_new, point["layer"])
        if mark in self._prefetched:
            return
        self._prefetched.add(mark)
        pts = [p for p in grid(self.cfg, self.hp.layer) if p["method"] in ("rome", "steam-rome")
               and p.get("batch") is None and p["layer"] == point["layer"]
               and not self.skipped([req], p)]
        if len(pts) < 2:
            return
        with rome.collect() as wanted:
            for p in pts:
                try:
                    edit(self.lm, req, p["method"], **self.edit_kwargs(p, [req]))
                except rome.Collected:
                    pass
                else:  # an editor that does not go through ROME's target vector
                    raise RuntimeError(f"{p['method']} wrote an edit while collecting")
        rome.compute_collected(wanted)

    def run_point(self, req, point) -> dict:
        """Edit with one request, measure it, undo; one row."""
        return self.run_unit([req], point)[0]

    def run_unit(self, reqs: list, point) -> list[dict]:
        """Edit with ``reqs`` at once (one request unless the point is a batch point),
        measure every request while the edit is in place, undo; one row per request."""
        from .editors import edit, edit_batch

        self.references()  # before any edit, whichever unit runs first
        t0 = time.perf_counter()
        info: dict = {}
        skip = self.skipped(reqs, point)
        if skip:
            rows = [dict(case_id=r.case_id, subject=r.subject, target_new=r.target_new,
                         target_true=r.target_true, skipped=skip) for r in reqs]
        elif point["method"] == "unedited":
            rows = [self.measure(r, point, None) for r in reqs]
        else:
            if len(reqs) == 1:
                self.prefetch(reqs[0], point)
            kw = self.edit_kwargs(point, reqs)
            t = time.perf_counter()
            ctx = (edit_batch(self.lm, reqs, point["method"], **kw) if point.get("batch")
                   else edit(self.lm, reqs[0], point["method"], **kw))
            with ctx as e:
                losses = e.info.get("losses") or [{}]
                shared = e.info.get("seconds_opt", 0.0) if e.info.get("v_reused") else 0.0
                info = dict(edit_seconds=(time.perf_counter() - t) / len(reqs) + shared,
                            steps=e.info.get("steps"),
                            final_nll=losses[-1].get("nll") if isinstance(losses[-1], dict)
                            else None)
                rows = [self.measure(r, point, e.info) for r in reqs]
        secs = (time.perf_counter() - t0) / len(reqs)
        out = []
        for req, row in zip(reqs, rows):
            row.update(info)
            row.update({k: (json.dumps(v) if isinstance(v, list) else v)
                        for k, v in point.items()})
            row["relation_id"] = req.relation_id
            row["seconds"] = secs
            out.append({k: _jsonable(v) for k, v in row.items()})
        return out


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
    old = {**{k: default[k] for k in set(new) - set(old) if k in default}, **old}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def run_sweep(cfg: SweepConfig, run_dir, lm=None, progress: bool = True,
              log=print, executor: str = "local", force: bool = False,
              **executor_options) -> pd.DataFrame:
    """Run every (request, grid point) not yet in ``run_dir``'s store; return all rows.

    ``executor``: ``"local"`` (this process) or ``"ray"`` (a Ray cluster; ``executor_options``
    such as ``address``, ``workers`` go to :class:`steamviz.executors.RayExecutor`).
    A run folder holds the points of one config: a changed config is refused (before any
    work) unless ``force``, which adds its points to the folder and keeps every config in
    ``RUN/config-history/``."""
    from .executors import make_executor

    from .models import model_depth

    depth = getattr(lm, "n_layers", None) if lm is not None else model_depth(cfg.model)
    cfg.validate(depth)  # block indices too, before any load
    _check_data(cfg)
    run_dir = Path(run_dir)
    changed = _config_change(run_dir, cfg)
    if changed and not force:
        raise ConfigError(
            f"{run_dir} holds points of another config (changed: {', '.join(changed)}); write "
            "to another folder, or pass force=True (--force) to add this config's points to it")
    ex = make_executor(executor, cfg, lm=lm, log=log, **executor_options)  # fails before any work
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
        write_json(run_dir / "versions.json", _versions())
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
                store.put(key, row)
                _log_row(log, req, point, row)
            bar.update(len(rows))

        ex.run(left, done)
        bar.close()
    finally:
        ex.close()
        store.close()
    keys = {k for w in work for k in w[0]}
    df = store.frame()
    return df[df.key.isin(keys)].reset_index(drop=True) if len(df) else df


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
    from .datasets import load_named
    from .fetch import DataError
    from .requests import RequestError

    try:
        reqs = load_named(cfg.data, cfg.offset + cfg.n_edits)
    except (DataError, RequestError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'data': {e}") from None
    if len(reqs) <= cfg.offset:
        raise ConfigError(f"config key 'offset': {cfg.offset} skips every one of the "
                          f"{len(reqs)} requests in {cfg.data!r}")


def _log_row(log, req, point, row) -> None:
    lam = "" if point["lam"] is None else f" lam={point['lam']:g}"
    b = f" batch={point['batch']}" if point.get("batch") else ""
    log(f"[point] {req.case_id} {point['method']}{lam}{b} L={point['layer']}: "
        f"eff={_fmt(row.get('efficacy'))} para={_fmt(row.get('paraphrase'))} "
        f"nbhd={_fmt(row.get('neighborhood'))} cos_c={_fmt(row.get('cos_centered'))} "
        f"knn={_fmt(row.get('knn_share'))} ({row['seconds']:.1f} s)")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per grid point (method, lambda, layer, alignment set, centring, batch).
    Integration columns are held out (paraphrases); ``*_trained`` is the rewrite prompt and
    ``*_control`` the same measurement against other objects' anchors. For paired
    differences with confidence intervals use :func:`steamviz.compare.paired`."""
    cols = [c for c in ["efficacy", "paraphrase", "neighborhood", "portability", "fluency",
                        "consistency", "cos_raw", "cos_centered", "cos_centered_control",
                        "cos_centered_trained", "knn_share", "axis", "steps", "final_nll",
                        "edit_seconds"] if c in df.columns]
    by = ["method", "lam", "layer", "align_layers", "centered"]
    d = df.copy()
    if "batch" in d.columns:
        by.append("batch")  # anchor seeds are averaged over, as edits are
    for b in by:
        d[b] = d[b].astype(str)
    return d.groupby(by, sort=False, dropna=False)[cols].mean().round(3).reset_index()
