"""A sweep's plan: its config (:class:`SweepConfig`, the YAML schema), the grid of points it
spans (:func:`grid`), the order they run in (:func:`units`) and each point's key
(:func:`point_key`). Pure data: nothing here loads a model.

>>> cfg = SweepConfig(n_edits=10, methods=["rome", "steam-rome"], lams=[5, 20, 50])
>>> [p["method"] for p in grid(cfg, default_block=5)][:3]           # doctest: +SKIP
['unedited', 'rome', 'steam-rome']

Config schema: YAML keys = :class:`SweepConfig` fields; unknown keys are refused. Keys
renamed since (``edit_layers`` -> ``edit_blocks``; ``layer`` -> ``block`` in ``hparams``;
an editor's renamed fields in ``method_params``) are read under their old names
(:meth:`SweepConfig.upgrade`). Vocabulary: ``block`` is a decoder-block index, ``layer`` a
residual-stream index (:mod:`steamviz.edit.hparams`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path




class ConfigError(ValueError):
    pass


@dataclass
class SweepConfig:
    """A sweep. ``data``: 'default' (data/edits.jsonl), 'counterfact' (shared val set) or a
    file path. ``align_layers``: list of stream-layer lists, or "default" (mid layers above
    the edited block). ``edit_blocks``: the edited blocks (None: the model's default ROME
    block)."""

    #: old config key -> new one (read by :meth:`upgrade`)
    RENAMED = {"edit_layers": "edit_blocks"}

    model: str | None = None
    device: str = "auto"
    data: str = "default"
    n_edits: int = 10
    offset: int = 0
    methods: list = field(default_factory=lambda: ["rome", "steam-rome"])
    lams: list = field(default_factory=lambda: [20.0])
    edit_blocks: list | None = None
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
    # .jsonl), "pool" (those plus LRE, ParaRel, Polyglot: steamviz.look.pool), or a facts file
    # (JSON lines) added to the pool
    reference_facts: str = "project"
    # which reference facts count as known (steamviz.look.anchors.recall_rule_ok): "greedy" (the
    # model generates the object) or "topK" (its first token among the K likeliest)
    recall_rule: str = "greedy"
    # objects of the requests short of an anchor get up to this many candidate facts per
    # relation (steamviz.look.pool.widen; each one a recall check on the unedited model); 0: off
    widen_to: int = 400
    # the ParaRel pattern per relation in the pool: "first" (the file's first usable one),
    # "best" (the one the unedited model completes best on subjects this run does not
    # evaluate: steamviz.look.pool.choose_patterns), or a JSON file {relation: template}
    pararel_patterns: str = "first"
    hparams: dict = field(default_factory=dict)  # ROME hyperparameter overrides
    batch_sizes: list = field(default_factory=lambda: [1])  # for batch editors (MEMIT)
    method_params: dict = field(default_factory=dict)  # {method: {param: value}}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        if not isinstance(d, dict):
            raise ConfigError("a sweep config is a mapping of keys to values")
        d = cls.upgrade(d)
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k in d:
            if k in cls.RENAMED:  # both the old and the new name were given
                raise ConfigError(f"config key {k!r} is {cls.RENAMED[k]!r} now, which is given "
                                  "too; keep one")
            if k not in names:
                raise ConfigError(f"unknown config key {k!r}; allowed: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """A config mapping written before a rename, in today's names: renamed keys, ROME's
        renamed fields in ``hparams`` and each editor's in ``method_params`` (a name that is
        both old and new in one mapping is left for validation to refuse)."""
        from ..edit.editors import spec
        from ..edit.hparams import renamed
        from ..edit.rome_hparams import ROMEHparams

        out = renamed(cls, d)
        if isinstance(out.get("hparams"), dict):
            out["hparams"] = renamed(ROMEHparams, out["hparams"])
        if isinstance(out.get("method_params"), dict):
            mp = {}
            for m, params in out["method_params"].items():
                try:
                    cls_ = spec(m).params
                except ValueError:
                    cls_ = None
                mp[m] = renamed(cls_, params) if cls_ and isinstance(params, dict) else params
            out["method_params"] = mp
        return out

    @classmethod
    def from_yaml(cls, path) -> "SweepConfig":
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(d)

    def validate(self, n_blocks: int | None = None) -> None:
        """Refuse a bad value naming its key (:class:`ConfigError`). With ``n_blocks`` (the
        model's depth, :func:`steamviz.core.models.model_depth`), block indices are checked too."""
        from ..edit.editors import check_params, methods

        known = methods(batch=False)  # a sweep edits one request at a time, or in batches of it

        def need(cond, key, what):
            if not cond:
                raise ConfigError(f"config key {key!r}: {what} (got {getattr(self, key)!r})")

        need(isinstance(self.methods, list) and self.methods, "methods", "a non-empty list")
        for m in self.methods:
            need(str(m).lower() in known, "methods", f"each one of {known}")
        need(isinstance(self.lams, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
            for x in self.lams), "lams", "a list of numbers >= 0")
        need(isinstance(self.n_edits, int) and self.n_edits > 0, "n_edits", "a positive integer")
        need(self.edit_blocks is None or (isinstance(self.edit_blocks, list) and all(
            isinstance(x, int) for x in self.edit_blocks)), "edit_blocks", "null or a list of ints")
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
        from ..look.anchors import recall_rule_ok

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
            str(k).lower() in known and isinstance(v, dict)
            for k, v in self.method_params.items()), "method_params",
            f"a mapping of method (one of {known}) to a mapping of parameters")
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
        top = "" if n_blocks is None else f" and < {n_blocks} (the model's blocks)"
        need(all(0 <= x < (n_blocks or 10**9) for x in self.edit_blocks or []), "edit_blocks",
             f"block indices >= 0{top}")
        top = "" if n_blocks is None else f" and <= {n_blocks} (the model's stream layers)"
        need(all(x == "default" or all(1 <= i <= (n_blocks or 10**9) for i in x)
                 for x in self.align_layers), "align_layers", f"stream layers >= 1{top}")
        need(isinstance(self.hparams, dict), "hparams", "a mapping of ROME hyperparameters")
        why = check_params("rome", self.hparams, n_blocks)
        need(why is None, "hparams", why)
        for m, params in self.method_params.items():
            why = check_params(str(m), params, n_blocks)
            need(why is None, "method_params", f"{m}: {why}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def seeds(self) -> list[int]:
        """The anchor-sampling seeds of the grid."""
        return list(self.anchor_seeds) if self.anchor_seeds is not None else [self.seed]


def axes(method: str) -> tuple[str, ...]:
    """The grid axes of ``method`` -- ``block`` (edited block), ``lam`` (alignment strength,
    alignment layers, centring), ``batch`` (requests edited at once) -- as registered
    (:func:`steamviz.edit.editors.spec`); the ``unedited`` point has none."""
    from ..edit.editors import spec

    return () if str(method).lower() == "unedited" else spec(method).axes


def grid(cfg: SweepConfig, default_block: int) -> list[dict]:
    """The grid points (without requests).

    Each point holds ``method, block, lam, align_layers, centered``; points of batch
    editors also hold ``batch`` (the number of requests edited at once); with
    ``anchor_seeds``, every point also holds ``anchor_seed``.
    """
    pts = []
    blocks = cfg.edit_blocks or [default_block]
    if cfg.include_unedited:
        pts.append(dict(method="unedited", block=None, lam=None, align_layers=None,
                        centered=None))
    for m in cfg.methods:
        m = m.lower()
        has = axes(m)
        batches = cfg.batch_sizes if "batch" in has else [None]
        for size in batches:
            for block in blocks if "block" in has else [None]:
                if "lam" in has:
                    steam = [(float(lam), al, c) for lam in cfg.lams for al in cfg.align_layers
                             for c in cfg.centered]
                else:
                    steam = [(None, None, None)]
                for lam, al, c in steam:
                    pt = dict(method=m, block=block, lam=lam, align_layers=al, centered=c)
                    if size is not None:
                        pt["batch"] = int(size)
                    pts.append(pt)
    if cfg.anchor_seeds is None:  # one seed: points keep their keys of before the axis
        return pts
    return [dict(p, anchor_seed=s) for s in cfg.seeds for p in pts]


def units(requests: list, points: list[dict]) -> list[tuple[list, dict]]:
    """Work units: ``(requests edited together, point)``, request by request (a batch unit at
    its first request), each request's in grid order: a run stopped early holds every point of
    its first requests, paired, rather than one method on all of them. Batch points chunk the
    request list into consecutive batches of ``point["batch"]``; every other point is one
    request."""
    out = []
    for p in points:
        b = p.get("batch")
        if b is None:
            out += [(i, [r], p) for i, r in enumerate(requests)]
        else:
            out += [(i, requests[i : i + b], p) for i in range(0, len(requests), b)]
    out.sort(key=lambda u: u[0])  # stable: grid order within a request
    return [(batch, p) for _, batch, p in out]


#: names as they were in keys before the block/layer rename: a point's key is computed from
#: them, so run folders written before it resume
KEY_NAMES = {"block": "layer", "blocks": "layers", "block_span": "layer_span"}


def _key_names(d):
    if not isinstance(d, dict):
        return d
    return {KEY_NAMES.get(k, k): _key_names(v) for k, v in d.items()}


def point_key(fingerprint: str, request: dict, point: dict, hparams: dict, seed: int,
              extra: dict) -> str:
    """The store key of a point: a hash of everything that determines its row. Parameter
    names enter in their names of before the block/layer rename (:data:`KEY_NAMES`)."""
    blob = json.dumps(dict(model=fingerprint, request=request, point=_key_names(point),
                           hparams=_key_names(hparams), seed=seed, **_key_names(extra)),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def request_digest(request: dict) -> str:
    """A short hash of a request's whole content (``EditRequest.to_dict()``): rows carry it,
    so a request changed under the same case id is told apart from its old rows.

    >>> request_digest({"subject": "Paris", "case_id": 1}) == request_digest(
    ...     {"case_id": 1, "subject": "Paris"})
    True
    """
    blob = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
