"""The demo: edit a few facts with ROME and STEAM-ROME, and see where each edit lives.

    steamviz demo --out runs/demo        # or: bash scripts/demo.sh

Edits the first ``n_edits`` facts of the project's default edit set (``data/edits.jsonl``)
with ROME and with STEAM-ROME (same steps and context prompts), one at a time, each undone
before the next, and writes ``OUT/report.html`` (self-contained with ``OUT/plotly.min.js``;
works offline), ``OUT/report.md`` and ``OUT/report.json`` with four views:

1. **completions** of the rewrite prompt and of a paraphrase, before and after each edit;
2. **per-layer cosine** (centred) of the paraphrase prompts' last-token stream to the new
   object's anchor -- unedited, ROME, STEAM -- with the control anchors (other objects of the
   same relations) dashed;
3. **latent maps** of the edits' neighbourhood (the unedited model's streams of the old and
   new objects' reference facts) at a middle alignment layer and at a late layer, each edit
   drawn as arrows from its unedited stream to ROME's and to STEAM's;
4. the **logit lens**: per layer, the probability of the new and the old object on the
   paraphrase prompts.

Views 2-4 read the *paraphrases*, which neither editor optimised (held out); the rewrite
prompt is the one STEAM's loss pulls toward the anchor. Anchors, controls and the bank come
from the unedited model, before the first edit (:mod:`steamviz.measure.references`). PNGs of views
2-4 go beside the report when a Chromium browser is installed (:func:`steamviz.show.figures.export`).

>>> summary = run_demo(lm, "runs/demo")          # doctest: +SKIP
>>> summary["html"]                               # doctest: +SKIP
'runs/demo/report.html'
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np

METHODS = ("rome", "steam-rome")


def _states(lm, req, anchor, controls, center) -> dict:
    """What the model does now on ``req``: completions, held-out streams, cosines, lens."""
    from ..core.forward import greedy, target_logprobs
    from ..measure.integration import anchor_cosines, last_streams, logit_lens

    held = list(req.paraphrase_prompts) or [req.rewrite_prompt]
    outs = greedy(lm, [req.rewrite_prompt, held[0]], max_new_tokens=8)
    h = last_streams(lm, held)  # [prompt, layer, d]
    cos = anchor_cosines(h, anchor.phi.to(h.device), center)["cos_centered"]
    ctl = np.mean([anchor_cosines(h, c.phi.to(h.device), center)["cos_centered"]
                   for c in controls], axis=0) if controls else None
    lens = []
    for p in held:
        lens += logit_lens(lm, p, {"new": req.target_new, "old": req.target_true})
    lp = target_logprobs(lm, [req.rewrite_prompt] * 2, [req.target_new, req.target_true])
    return dict(
        completion=outs[0], completion_paraphrase=outs[1],
        efficacy=bool(lp[0]["logprob"] > lp[1]["logprob"]),
        stream=h.mean(0),  # [layer, d], mean over the held-out prompts
        cos_centered_layers=cos, cos_centered_control_layers=ctl, lens=lens,
        held_out=held[0] != req.rewrite_prompt)


def run_demo(lm, out, n_edits: int = 4, lam: float | None = None, map_layer: int | None = None,
             hparams: dict | None = None, png: bool = True, log=print) -> dict:
    """Run the demo into folder ``out`` (see module docstring); returns a summary with the
    paths written. ``hparams``: ROME overrides (the default is ROME's own budget, fixed
    steps, as sweeps use)."""
    import pandas as pd

    from . import figures
    from ..data.datasets import load_edits
    from ..edit.editors import edit
    from ..measure.geometry import fit_map
    from ..measure.integration import last_streams
    from ..measure.references import build_references
    from ..edit.rome import ROMEHparams
    from ..edit.steam import DEFAULT_LAM, default_layers

    t0 = time.perf_counter()
    out = Path(out)
    lam = DEFAULT_LAM if lam is None else float(lam)
    hp = ROMEHparams.for_model(lm).replace(early_stop_loss=0.0, **(hparams or {}))
    align = default_layers(lm, hp.block)
    layer = align[len(align) // 2] if map_layer is None else int(map_layer)
    late = min(lm.n_blocks - 1, round(0.85 * lm.n_blocks))  # past the alignment layers
    reqs = load_edits(limit=n_edits)
    log(f"[demo] {len(reqs)} edits, ROME and STEAM-ROME (lambda {lam:g}, alignment layers "
        f"{align[0]}-{align[-1]}), {hp.v_num_grad_steps} steps each; building references")
    refs = build_references(lm, reqs, bank_size=600)  # before any edit
    center = refs.bank.mean
    rows = []
    for req in reqs:
        anchor = refs.anchor(req.target_new)
        if anchor is None:
            log(f"[demo] skipped {req.subject}: {refs.missing[(req.target_new, 0)]}")
            continue
        controls = refs.controls(req.target_new)
        st = {"unedited": _states(lm, req, anchor, controls, center)}
        for method in METHODS:
            kw = dict(hparams=hp)
            if method == "steam-rome":
                kw.update(lam=lam, anchor=anchor, bank=refs.bank)
            t1 = time.perf_counter()
            with edit(lm, req, method, **kw):
                st[method] = _states(lm, req, anchor, controls, center)
            st[method]["seconds"] = time.perf_counter() - t1
            log(f"[demo] {req.subject} -> {req.target_new}: {method} "
                f"({st[method]['seconds']:.0f} s) says {st[method]['completion'].strip()!r}")
        rows.append((req, st))
    if not rows:
        raise RuntimeError("no demo edit had an anchor for its new object")

    # views 2-4
    cos_rows, lens_rows = [], []
    for req, st in rows:
        for m, s in st.items():
            cos_rows.append(dict(method=m, lam=lam if m == "steam-rome" else None,
                                 centered=False, case_id=req.case_id,
                                 cos_centered_layers=s["cos_centered_layers"],
                                 cos_centered_control_layers=s["cos_centered_control_layers"]))
            lens_rows += [dict(r, method=m) for r in s["lens"]]
    fig_cos = figures.layer_cosine(pd.DataFrame(cos_rows), align_layers=align)
    objects = sorted({o for r, _ in rows for o in (r.target_new, r.target_true)
                      if refs.anchor(o) is not None})
    facts = [f for o in objects for f in refs.anchor(o).facts]
    all_streams = last_streams(lm, [f.prompt for f in facts])  # unedited (no edit is active)
    figs = {"cosine": fig_cos}
    for name, L in (("latent_map", layer), ("latent_map_late", late)):
        moves = [dict(label=r.subject, pre=st["unedited"]["stream"][L],
                      post={m: st[m]["stream"][L] for m in METHODS}) for r, st in rows]
        figs[name] = figures.edit_map(
            fit_map(all_streams[:, L], method="pca"), all_streams[:, L],
            [f.object for f in facts], L, moves,
            anchors={o: refs.anchor(o).phi[L] for o in objects})
    figs["logit_lens"] = figures.logit_lens_lines(lens_rows)

    summary = _numbers(rows, align, layer, lam, hp, len(facts))
    summary["map_layer_late"] = late
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    pngs, png_note = {}, None
    if png:
        try:
            for name, fig in figs.items():
                pngs[name] = figures.export(fig, out / name, formats=("png",))[0].name
        except figures.ExportError as e:
            png_note = str(e)
            log(f"[demo] no PNGs: {e}")
    _write(out, rows, figs, summary, pngs, png_note)
    summary["html"] = str(out / "report.html")
    log(f"[demo] done in {time.perf_counter() - t0:.0f} s; open {out / 'report.html'}")
    return summary


def _numbers(rows, align, layer, lam, hp, n_map) -> dict:
    """The report's numbers (JSON-ready)."""
    edits = []
    for req, st in rows:
        e = dict(case_id=req.case_id, subject=req.subject, prompt=req.rewrite_prompt,
                 paraphrase=(req.paraphrase_prompts or [req.rewrite_prompt])[0],
                 target_true=req.target_true, target_new=req.target_new)
        for m, s in st.items():
            cos = np.asarray(s["cos_centered_layers"])
            ctl = s["cos_centered_control_layers"]
            e[m] = dict(completion=s["completion"], completion_paraphrase=s["completion_paraphrase"],
                        efficacy=s["efficacy"],
                        cos_centered=round(float(cos[align].mean()), 4),
                        cos_centered_control=None if ctl is None else round(float(
                            np.asarray(ctl)[align].mean()), 4),
                        cos_centered_layers=[round(float(x), 4) for x in cos])
            if "seconds" in s:
                e[m]["seconds"] = round(s["seconds"], 1)
        edits.append(e)
    return dict(edits=edits, lam=lam, align_layers=align, map_layer=layer, map_facts=n_map,
                steps=hp.v_num_grad_steps, edit_block=hp.block)


def _table(summary) -> list[list[str]]:
    head = ["edit", "prompt", "unedited", "ROME", "STEAM-ROME"]
    body = []
    for e in summary["edits"]:
        edit_ = f"{e['subject']}: {e['target_true']} -> {e['target_new']}"
        for key, prompt in (("completion", e["prompt"]),
                            ("completion_paraphrase", e["paraphrase"] + " (held out)")):
            body.append([edit_, prompt] + [e[m][key].strip().replace("\n", " ")
                                           for m in ("unedited",) + METHODS])
    return [head] + body


def _cos_table(summary) -> list[list[str]]:
    a = summary["align_layers"]
    head = ["edit", f"unedited (layers {a[0]}-{a[-1]})", "ROME", "STEAM-ROME", "control (STEAM)"]
    body = [[e["subject"]] + [f"{e[m]['cos_centered']:+.3f}" for m in ("unedited",) + METHODS]
            + ["-" if e["steam-rome"]["cos_centered_control"] is None
               else f"{e['steam-rome']['cos_centered_control']:+.3f}"]
            for e in summary["edits"]]
    return [head] + body


def _md_table(t) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in t]
    return "\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
                     + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _html_table(t) -> str:
    th = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                  for r in t[1:])
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


CAPTIONS = {
    "cosine": "Per layer, the centred cosine between the paraphrase prompts' last-token stream "
              "and the new object's anchor (mean over edits, 95% band); dashed: the same "
              "cosine to control anchors (other objects of the same relations). Shaded: "
              "STEAM's alignment layers. Where a method's two lines meet, the layer carries "
              "nothing specific to the new object.",
    "latent_map": "Latent map at layer {layer}, the middle of STEAM's alignment layers (PCA "
                  "fitted on the unedited model's streams of the old and new objects' recalled "
                  "reference facts, {n} facts). Stars: anchors. Each edit is an open circle "
                  "(its paraphrase stream, unedited, labelled with the subject) with arrows to "
                  "ROME's and STEAM's edited streams.",
    "latent_map_late": "The same at layer {late}, past the alignment layers, where the edits "
                       "move the held-out stream most (see view 2).",
    "logit_lens": "Logit lens on the paraphrase prompts: each layer's stream read out through "
                  "the final norm and the unembedding; probability (log axis) of the new "
                  "object's first token (solid) and the old object's (dashed), mean over edits "
                  "and prompts.",
}


def _write(out: Path, rows, figs, summary, pngs, png_note) -> None:
    from ..core.io import write_bytes, write_json, write_text

    import plotly

    out.mkdir(parents=True, exist_ok=True)
    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not (out / "plotly.min.js").exists():  # beside the report: it opens offline
        write_bytes(out / "plotly.min.js", js.read_bytes())
    cap = {k: v.format(layer=summary["map_layer"], n=summary["map_facts"],
                       late=summary["map_layer_late"]) for k, v in CAPTIONS.items()}
    titles = {"cosine": "2. Per-layer cosine to the new object's anchor (held out)",
              "latent_map": "3. Latent map: where each edit moves the stream",
              "latent_map_late": "3b. Latent map, late layer",
              "logit_lens": "4. Logit lens (held out)"}
    e = summary["edits"]
    rome_eff = sum(x["rome"]["efficacy"] for x in e)
    steam_eff = sum(x["steam-rome"]["efficacy"] for x in e)
    lead = (f"{len(e)} edits of the default edit set; ROME and STEAM-ROME (lambda "
            f"{summary['lam']:g}, alignment layers {summary['align_layers'][0]}-"
            f"{summary['align_layers'][-1]}, edited block {summary['edit_block']}, "
            f"{summary['steps']} steps each). New object preferred over the old on the rewrite "
            f"prompt: ROME {rome_eff}/{len(e)}, STEAM {steam_eff}/{len(e)}. "
            f"Run time {summary['seconds']:.0f} s.")
    md = ["# steamviz demo: isolated vs integrated edits", "", lead, "",
          "## 1. Completions (greedy, 8 tokens)", "", _md_table(_table(summary)), "",
          "Mean centred cosine to the new object's anchor over the alignment layers "
          "(paraphrase prompts, held out):", "", _md_table(_cos_table(summary)), ""]
    parts = [f"<h1>steamviz demo: isolated vs integrated edits</h1><p>{html.escape(lead)}</p>",
             "<h2>1. Completions (greedy, 8 tokens)</h2>", _html_table(_table(summary)),
             "<p>Mean centred cosine to the new object's anchor over the alignment layers "
             "(paraphrase prompts, held out):</p>", _html_table(_cos_table(summary))]
    for name, fig in figs.items():
        md += [f"## {titles[name]}", "", cap[name], ""]
        if name in pngs:
            md += [f"![{name}]({pngs[name]})", ""]
        parts += [f"<h2>{html.escape(titles[name])}</h2>", f"<p>{html.escape(cap[name])}</p>",
                  fig.to_html(full_html=False, include_plotlyjs=False, div_id=name)]
    if png_note:
        md += [f"_No PNGs: {png_note}_", ""]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>steamviz demo</title>"
            "<script src='plotly.min.js'></script><style>body{font-family:Arial,sans-serif;"
            "max-width:960px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    write_json(out / "report.json", {k: v for k, v in summary.items() if k != "html"})
    write_text(out / "report.md", "\n".join(md))
    write_text(out / "report.html", page)

