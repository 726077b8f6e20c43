"""The worker of a sweep: :class:`Runner` holds the model and everything shared across
points (references built from the unedited model before any edit, context prompts, target
vectors) and runs one unit of points at a time. :mod:`steamviz.run.executors` drives it, here or
on Ray workers; :func:`steamviz.run.sweep.run_sweep` drives the executors.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path



from .plan import SweepConfig, axes, grid, point_key
from .store import jsonable


class Runner:
    """Holds the model and everything shared across points (see :func:`steamviz.run.sweep.run_sweep`)."""

    def __init__(self, cfg: SweepConfig, lm=None, vstar_dir=None):
        """``vstar_dir``: where the target vectors the grid optimises together are saved and
        read back (``RUN/vstar`` in a sweep), so a resumed run does not optimise them again."""
        from ..core.models import load_model
        from ..edit.rome import ROMEHparams

        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, device=cfg.device)
        cfg.validate(self.lm.n_blocks)  # block indices (a model whose config was not readable)
        budget = {} if cfg.early_stop else {"early_stop_loss": 0.0}  # matched: fixed steps
        self.hp = ROMEHparams.for_model(self.lm).replace(**{"seed": cfg.seed, **budget,
                                                            **cfg.hparams})
        self.vstar_dir = None if vstar_dir is None else Path(vstar_dir)
        self._references = None
        self._prefetched: set = set()  # (request, block) whose target vectors are computed
        # the anchor-free metrics of one edit, measured once and shared by its seed points
        # (:meth:`_edit_identity`)
        self._evaluated: dict = {}

    def requests(self):
        from ..data.datasets import load_named

        reqs = load_named(self.cfg.data, self.cfg.offset + self.cfg.n_edits)
        return reqs[self.cfg.offset :]

    def references(self):
        """Every anchor, the bank and the reference texts of this run, built from the
        unedited model on first use -- which :func:`steamviz.run.executors.plan` makes happen
        before any edit (the builders refuse an edited model)."""
        if self._references is None:
            from ..measure.references import build_references

            facts = None
            if self.cfg.reference_facts != "project":
                from ..look.pool import load_pool

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
            from ..look.pool import best_templates

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
        from ..edit.steam import default_layers

        al = point.get("align_layers") or "default"
        b = point["block"] if point.get("block") is not None else self.hp.block
        return default_layers(self.lm, b) if al == "default" else list(al)

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
                         self.hp.replace(block=point["block"] or self.hp.block).to_dict(),
                         self.cfg.seed, extra)

    def measure(self, req, point, edit_info: dict | None) -> dict:
        """Every metric of ``req`` on the model as it is now. Integration columns are
        measured against references built before any edit; without an anchor for the new
        object, ``anchor_missing`` says why and they are absent."""
        from ..measure.integration import integration_rows
        from ..measure.metrics import evaluate

        cfg = self.cfg
        refs = self.references()
        seed = point.get("anchor_seed", cfg.seed)
        anchor = self.anchor(req.target_new, seed)
        memo = self._edit_identity(req, point, anchor)
        if memo is not None and memo in self._evaluated:
            row = dict(self._evaluated[memo])
        else:
            ref = refs.text(req.target_new) if cfg.generation else None
            row = evaluate(self.lm, req, generation=cfg.generation, ref_text=ref,
                           max_new_tokens=cfg.max_new_tokens)
            if memo is not None:
                self._evaluated[memo] = dict(row)
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

    def _edit_identity(self, req, point, anchor) -> str | None:
        """What determines the edit of ``req`` at ``point``, without the anchor seed: the
        seed points of one edit share its anchor-free metrics. An edit that does not read
        the anchor (unedited, ROME, ...) is one edit for every seed; a STEAM edit is one edit
        for the seeds whose anchors are equal (seeds that drew the same facts). None: not
        shared (batch edits; a STEAM point without an anchor)."""
        if point.get("batch") is not None:
            return None
        what = {k: v for k, v in point.items() if k != "anchor_seed"}
        if "lam" in axes(point["method"]):
            if anchor is None:
                return None
            what["anchor"] = hashlib.sha256(
                anchor.phi.detach().float().cpu().numpy().tobytes()).hexdigest()
        return json.dumps([req.to_dict(), what], sort_keys=True)

    def edit_kwargs(self, point, reqs: list | None = None) -> dict:
        """Keyword arguments of :func:`steamviz.edit.editors.edit` (or ``edit_batch``) for a grid
        point; STEAM methods get the run's anchors and bank (built before any edit)."""
        m = point["method"]
        kw = dict(self.cfg.method_params.get(m) or {})
        has = axes(m)
        if "block" in has:
            kw.update(block=point["block"], hparams=self.hp)
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
        """Optimise together the target vectors of every point of the grid whose method edits
        through ROME's v* (registry ``vstar``: ROME, STEAM-ROME) for ``req`` at ``point``'s
        edited block (lambdas, alignment sets, centring, anchor seeds and plain ROME:
        :func:`steamviz.edit.rome.compute_vs`), once per request and block; the edits then
        read them from ROME's cache. The group is always the whole grid's, so
        a resumed run, a Ray worker and a fresh run compute the same vectors; with
        ``vstar_dir`` they are saved there and read back by a resumed run."""
        from ..edit import rome
        from ..edit.editors import edit, spec

        def vstar(p):
            return p["method"] != "unedited" and spec(p["method"]).vstar and p.get("batch") is None

        if not vstar(point):
            return
        mark = (req.case_id, req.subject, req.target_new, point["block"])
        if mark in self._prefetched:
            return
        self._prefetched.add(mark)
        pts = [p for p in grid(self.cfg, self.hp.block) if vstar(p) and p["block"] == point["block"]
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
        if self.vstar_dir is not None:
            rome.load_saved(wanted, self.vstar_dir)
        rome.compute_collected(wanted)
        if self.vstar_dir is not None:
            rome.save_computed(wanted, self.vstar_dir)

    def run_point(self, req, point) -> dict:
        """Edit with one request, measure it, undo; one row."""
        return self.run_unit([req], point)[0]

    def run_unit(self, reqs: list, point) -> list[dict]:
        """Edit with ``reqs`` at once (one request unless the point is a batch point),
        measure every request while the edit is in place, undo; one row per request."""
        from ..edit.editors import edit, edit_batch

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
            out.append({k: jsonable(v) for k, v in row.items()})
        return out


