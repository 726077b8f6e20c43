"""Figures that need the model: a run's edits applied again.

A sweep's store holds numbers per layer, not residual streams, so the latent map and the
logit lens of a run cannot be drawn from it. :func:`replay_figures` re-applies the run's
ROME and STEAM-ROME edits the way the sweep made them -- the run's config
(``RUN/config.yaml``), the references built from the unedited model before any edit, the
same target vectors (:class:`steamviz.run.sweep.Runner`) -- and, with each edit in place, reads
the held-out (paraphrase) streams and their logit lens:

- ``latent_map``: one panel per edit (:func:`steamviz.show.figures.edit_map`, ``facet=True``):
  the unedited model's streams of the old and new objects' reference facts at the middle
  alignment layer, the anchors, and arrows from the unedited paraphrase stream to ROME's
  and STEAM's;
- ``logit_lens``: :func:`steamviz.show.figures.logit_lens_lines` on the paraphrases.

>>> figs = replay_figures("docs/gallery/run")            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _points(runner) -> dict[str, dict]:
    """The grid points drawn: the run's first method with an alignment strength (STEAM-ROME)
    at its largest lambda (default alignment layers and no centring when the run has them),
    and the method it extends (ROME), both by the registry -- or, in a run without such a
    method, every editor's first point -- at the run's first edited block."""
    from ..edit.editors import aligned
    from ..run.plan import grid

    pts = [p for p in grid(runner.cfg, runner.hp.block)
           if p.get("batch") is None and p.get("anchor_seed") in (None, runner.cfg.seed)]
    first = next((p["block"] for p in pts if p["block"] is not None), None)
    pts = [p for p in pts if p["block"] in (None, first)]
    pair = aligned(p["method"] for p in pts)
    if pair is None:  # no aligned method: every editor's first point
        firsts: dict[str, dict] = {}
        for p in pts:
            if p["method"] != "unedited":
                firsts.setdefault(p["method"], p)
        return firsts
    steered, base_method = pair
    out = {}
    base = [p for p in pts if p["method"] == base_method]
    if base:
        out[base_method] = base[0]
    steam = [p for p in pts if p["method"] == steered]
    top = max(p["lam"] for p in steam)
    steam = [p for p in steam if p["lam"] == top]
    steam.sort(key=lambda p: (p["align_layers"] != "default", bool(p["centered"])))
    out[steered] = steam[0]
    return out


def replay_figures(run, lm=None, map_method: str = "pca", layer: int | None = None,
                   device: str | None = None, log=print) -> dict:
    """``{"latent_map": fig, "logit_lens": fig}`` of the run folder ``run`` (see the module
    docstring). ``layer``: the map's layer (default: the middle of the STEAM point's
    alignment layers). ``lm``: the model (default: load the run's)."""
    import torch

    from . import figures
    from ..edit.editors import edit
    from ..measure.geometry import fit_map
    from ..measure.integration import last_streams, logit_lens
    from ..run.plan import SweepConfig
    from ..run.runner import Runner

    run = Path(run)
    cfg = SweepConfig.from_yaml(run / "config.yaml")
    if device:
        cfg.device = device
    torch.manual_seed(cfg.seed)
    runner = Runner(cfg, lm=lm)
    lm = runner.lm
    points = _points(runner)
    if not points:
        raise ValueError(f"{run}: the run has no edited point to replay")
    reqs = runner.requests()
    refs = runner.references()  # from the unedited model, before any edit
    align = runner.align_layers(list(points.values())[-1])  # the aligned method's point
    L = layer if layer is not None else align[len(align) // 2]
    reqs = [r for r in reqs if refs.anchor(r.target_new) is not None]
    if not reqs:
        raise ValueError(f"{run}: no edit of the run has an anchor for its new object")
    objects = sorted({o for r in reqs for o in (r.target_new, r.target_true)
                      if o and refs.anchor(o) is not None})
    facts = [f for o in objects for f in refs.anchor(o).facts]
    streams = last_streams(lm, [f.prompt for f in facts])[:, L]
    lmap = fit_map(streams, method=map_method)
    moves, lens = [], []
    for req in reqs:
        held = list(req.paraphrase_prompts) or [req.rewrite_prompt]
        targets = {"new": req.target_new, **({"old": req.target_true} if req.target_true else {})}
        move = dict(label=req.subject, new=req.target_new, old=req.target_true,
                    pre=last_streams(lm, held).mean(0)[L], post={})
        lens += [dict(r, method="unedited") for p in held for r in logit_lens(lm, p, targets)]
        for method, point in points.items():
            if runner.skipped([req], point):
                continue
            runner.prefetch(req, point)  # the sweep's target vectors, computed together
            with edit(lm, req, method, **runner.edit_kwargs(point, [req])):
                move["post"][method] = last_streams(lm, held).mean(0)[L]
                lens += [dict(r, method=method) for p in held
                         for r in logit_lens(lm, p, targets)]
            log(f"replayed {req.subject} -> {req.target_new}: {method}")
        moves.append(move)
    names = ", ".join(figures.label(m, p.get("lam")) for m, p in points.items())
    return {
        "latent_map": figures.edit_map(
            lmap, streams, [f.object for f in facts], L, moves,
            anchors={o: np.asarray(refs.anchor(o).phi[L]) for o in objects},
            facet=True, texts=[f.prompt for f in facts],
            title=f"Paraphrase streams at layer {L}, unedited → {names}"),
        "logit_lens": figures.logit_lens_lines(lens),
    }
