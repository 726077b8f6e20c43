"""Latent maps: the unedited model's streams of reference facts in two dimensions, framed
on an edit's neighbourhood, with each edit drawn as arrows (unedited -> ROME -> STEAM).

>>> fig = edit_map(lmap, streams, objects, layer=12, edits=moves)      # doctest: +SKIP
>>> fig = latent_map(lmap, bank, layer=12, anchors=anchors)            # doctest: +SKIP

:mod:`steamviz.show.figures` re-exports both.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import STYLE, color, label, style


def _map_axes(lmap, layer: int) -> tuple[str, str]:
    """Axis titles of a map: PCA components with their share of the variance (scores in
    residual-stream units), or UMAP's coordinates (no units)."""
    if lmap.method == "pca":
        ev = getattr(lmap.pca, "explained_variance_ratio_", None)
        share = [f", {100 * ev[i]:.0f}% of variance" if ev is not None and len(ev) > i else ""
                 for i in (0, 1)]
        return (f"PC 1 (stream units{share[0]}; layer {layer})", f"PC 2 (stream units{share[1]})")
    name = lmap.method.upper()
    return f"{name} 1 (no units; layer {layer})", f"{name} 2 (no units)"


#: where a label may sit around its point: (dx, dy) in {-1, 0, 1}, preferred first
_SPOTS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))


def place_labels(points, texts, obstacles, crowd, frame, px, font_size: int,
                 gap: float = 9.0) -> list[dict]:
    """Place a text label beside each of ``points`` (data coordinates) so labels overlap
    neither each other nor the ``obstacles`` (marked points: anchors, edits) and cover as
    few ``crowd`` points (facts) as they can: for each label the first of sixteen spots
    around its point (eight directions, ``gap`` and 2.6 ``gap`` px away) with the least
    overlap, in a plot region of ``px`` = (width, height) pixels
    showing ``frame`` = ((x0, x1), (y0, y1)). Returns one dict per label: plotly annotation
    keys (``xanchor``/``yanchor``/``xshift``/``yshift`` beside the point, or for a far spot
    a leader line: ``showarrow``, ``ax``/``ay``) and ``box`` (the label's pixels)."""
    (x0, x1), (y0, y1) = frame
    W, H = px
    sx, sy = W / max(x1 - x0, 1e-12), H / max(y1 - y0, 1e-12)

    def to_px(p):
        p = np.asarray(p, dtype=float).reshape(-1, 2)
        return np.c_[(p[:, 0] - x0) * sx, (p[:, 1] - y0) * sy]

    obs = to_px(obstacles) if len(obstacles) else np.zeros((0, 2))
    crw = to_px(crowd) if len(crowd) else np.zeros((0, 2))
    placed: list[tuple] = []
    out = []
    for (x, y), text in zip(to_px(points), texts):
        w, h = 0.6 * font_size * len(text) + 6, font_size + 6
        best = None
        for rank, (dx, dy, gp) in enumerate((dx, dy, g) for g in (gap, 2.6 * gap)
                                            for dx, dy in _SPOTS):
            left = x + gp if dx > 0 else x - gp - w if dx < 0 else x - w / 2
            bottom = y + gp if dy > 0 else y - gp - h if dy < 0 else y - h / 2
            box = (left, bottom, left + w, bottom + h)

            def inside(q, pad=0.0):
                return ((q[:, 0] > box[0] - pad) & (q[:, 0] < box[2] + pad)
                        & (q[:, 1] > box[1] - pad) & (q[:, 1] < box[3] + pad))

            over = sum(max(0.0, min(box[2], b[2]) - max(box[0], b[0]))
                       * max(0.0, min(box[3], b[3]) - max(box[1], b[1])) for b in placed)
            out_of_frame = (max(0, -box[0]) + max(0, box[2] - W) + max(0, -box[1])
                            + max(0, box[3] - H))
            score = (3 * over + 400 * inside(obs, 6).sum() + 20 * out_of_frame
                     + 3 * inside(crw).sum() + rank)
            if best is None or score < best[0]:
                best = (score, dx, dy, gp, box)
        _, dx, dy, g, box = best
        placed.append(box)
        if g > gap:  # a far spot: a leader line from the point to the label's centre
            cx, cy = (box[0] + box[2]) / 2 - x, (box[1] + box[3]) / 2 - y
            out.append(dict(showarrow=True, arrowhead=0, arrowwidth=0.8, arrowcolor="#888888",
                            ax=cx, ay=-cy, standoff=4, box=box))
        else:
            out.append(dict(xanchor={1: "left", -1: "right", 0: "center"}[dx],
                            yanchor={1: "bottom", -1: "top", 0: "middle"}[dy],
                            xshift=dx * g, yshift=dy * g, showarrow=False, box=box))
    return out


def _frame(facts: np.ndarray, keep: np.ndarray, k: float | None,
           home: np.ndarray | None = None):
    """Axis ranges framing the ``keep`` points (anchors, edits) and the facts that are not
    outliers, padded 8%, and how many facts fall outside. A fact is an outlier when its
    distance to its ``home`` (its object's anchor; default the nearest ``keep`` point) is
    beyond Tukey's fence of those distances (Q3 + ``k`` IQR): a far cluster of a few facts
    is left out as well as a lone point. ``k`` None: everything is framed."""
    pts = [keep] if len(keep) else []
    if len(facts):
        if k is not None and len(facts) > 10:
            if home is None:
                ref = keep if len(keep) else np.median(facts, axis=0)[None]
                d = np.linalg.norm(facts[:, None, :] - ref[None], axis=2).min(1)
            else:
                d = np.linalg.norm(facts - home, axis=1)
            q1, q3 = np.quantile(d, [0.25, 0.75])
            pts.append(facts[d <= q3 + k * (q3 - q1)])
        else:
            pts.append(facts)
    P = np.concatenate(pts) if pts else np.zeros((1, 2))
    a, b = P.min(0), P.max(0)
    span = np.where(b - a > 0, b - a, 1.0)
    a, b = a - 0.08 * span, b + 0.08 * span
    out = int((~((facts >= a) & (facts <= b)).all(1)).sum()) if len(facts) else 0
    return (a, b), out


def _ref(k: int, axis: str) -> str:
    return axis if k == 1 else f"{axis}{k}"


def _map_figure(emb: np.ndarray, objects: Sequence[str], anchors: dict, edits: list[dict],
                axes: tuple[str, str], texts: Sequence[str] | None = None,
                title: str | None = None, frame: float | None = 1.0, facet: bool = False,
                cols: int = 2, top_objects: int = 8) -> go.Figure:
    """The map drawing shared by :func:`edit_map` and :func:`latent_map`, in map
    coordinates: ``emb`` ``[n, 2]`` facts, ``anchors`` name -> ``[2]``, ``edits`` dicts with
    ``label``, ``pre`` ``[2]``, ``post`` {method: ``[2]``} and optionally ``new``/``old``."""
    from plotly.subplots import make_subplots

    emb = np.asarray(emb, dtype=float)
    objs = pd.Series([str(o) for o in objects])
    counts = objs.value_counts()
    top = list(counts.index[:top_objects])
    ocolor = {o: STYLE["object_colors"][i % len(STYLE["object_colors"])]
              for i, o in enumerate(top)}
    texts = list(texts) if texts is not None else list(objs)
    facet = facet and len(edits) > 1
    if facet:
        panels = [(e["label"] + (f": {e['old']} → {e['new']}" if e.get("new") and e.get("old")
                                 else f" → {e['new']}" if e.get("new") else ""), [e])
                  for e in edits]
    else:
        panels = [(None, list(edits))]
    n = len(panels)
    ncol = min(cols, n) if facet else 1
    nrow = math.ceil(n / ncol)
    fs = STYLE["font_size"]
    if facet:
        plot_h = 300 * nrow + 50 * (nrow - 1)
        fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[p[0] for p in panels],
                            horizontal_spacing=0.1,
                            vertical_spacing=min(0.3, 105 / plot_h) if nrow > 1 else 0.1)
    else:
        fig = go.Figure()
        plot_h = 440
    panel_px = ((STYLE["two_column"][0] - 110) / ncol - 20, plot_h / nrow - 60)
    methods = list(dict.fromkeys(m for e in edits for m in e["post"]))
    mcolor = {m: color(m) for m in methods}
    # earlier methods drawn larger: a point another method's covers still shows as a ring
    msize = {m: max(9, 16 - 4 * i) for i, m in enumerate(methods)}
    shown: set = set()

    def legend_once(key: str) -> bool:
        first = key not in shown
        shown.add(key)
        return first

    for k, (_, pe) in enumerate(panels, start=1):
        row, col = (k - 1) // ncol + 1, (k - 1) % ncol + 1
        xr, yr = _ref(k, "x"), _ref(k, "y")
        rc = dict(row=row, col=col) if facet else {}
        roles = {}
        if facet and pe[0].get("new"):
            roles = {pe[0]["new"]: "new", **({pe[0]["old"]: "old"} if pe[0].get("old") else {})}
        want = set(roles) if roles else set(counts.index)
        sel_all = objs.isin(want).to_numpy()
        for o in [o for o in counts.index if o in want and o in ocolor]:
            sel = (objs == o).to_numpy()
            fig.add_trace(go.Scatter(
                x=emb[sel, 0], y=emb[sel, 1], mode="markers", name=f"facts: {o}",
                legendgroup=f"facts {o}", showlegend=legend_once(f"facts {o}"),
                legendrank=1100 + top.index(o),
                marker=dict(size=6, color=ocolor[o], opacity=0.75, line=dict(width=0)),
                text=[t for t, s in zip(texts, sel) if s], hoverinfo="text"), **rc)
        rest = sel_all & ~objs.isin(list(ocolor)).to_numpy()
        if rest.any():
            fig.add_trace(go.Scatter(
                x=emb[rest, 0], y=emb[rest, 1], mode="markers", name="other facts",
                legendgroup="other facts", showlegend=legend_once("other facts"),
                legendrank=1100 + len(top),
                marker=dict(size=5, color=STYLE["other_facts"]),
                text=[t for t, s in zip(texts, rest) if s], hoverinfo="text"), **rc)
        names = [a for a in anchors if not roles or a in roles]
        keep = [np.asarray(anchors[a], float).reshape(2) for a in names]
        for a in names:
            xy = np.asarray(anchors[a], float).reshape(2)
            fig.add_trace(go.Scatter(
                x=[xy[0]], y=[xy[1]], mode="markers", name="anchor (mean of its facts)",
                legendgroup="anchor", showlegend=legend_once("anchor"), legendrank=1001,
                hovertext=[f"anchor: {a}"], hoverinfo="text",
                marker=dict(symbol="star", size=20, color="black",
                            line=dict(color="white", width=1.5))), **rc)
        for e in pe:
            pre = np.asarray(e["pre"], float).reshape(2)
            keep.append(pre)
            fig.add_trace(go.Scatter(
                x=[pre[0]], y=[pre[1]], mode="markers", name="unedited",
                legendgroup="unedited", showlegend=legend_once("unedited"), legendrank=1002,
                hovertext=[f"{e['label']}: unedited"], hoverinfo="text",
                marker=dict(size=13, symbol="circle-open", color="black",
                            line=dict(width=2.2))), **rc)
            for m, post in e["post"].items():
                xy = np.asarray(post, float).reshape(2)
                keep.append(xy)
                fig.add_trace(go.Scatter(
                    x=[xy[0]], y=[xy[1]], mode="markers", name=label(m), legendgroup=m,
                    showlegend=legend_once(m), hovertext=[f"{e['label']}: {label(m)}"],
                    legendrank=1003 + methods.index(m),
                    hoverinfo="text", marker=dict(size=msize[m], color=mcolor[m],
                                                  line=dict(color="white", width=1.2))), **rc)
                fig.add_annotation(x=xy[0], y=xy[1], ax=pre[0], ay=pre[1], xref=xr, yref=yr,
                                   axref=xr, ayref=yr, showarrow=True, arrowhead=2,
                                   arrowsize=1.1, arrowwidth=2.4, arrowcolor=mcolor[m],
                                   standoff=6, startstandoff=7, text="")
        keep_a = np.array(keep) if keep else np.zeros((0, 2))
        shown_facts = emb[sel_all]
        home = None
        if len(shown_facts) and keep:  # each fact's own anchor, else the nearest marked point
            near = np.linalg.norm(shown_facts[:, None] - keep_a[None], axis=2).argmin(1)
            home = np.array([anchors[o] if o in anchors else keep_a[j]
                             for o, j in zip(objs[sel_all], near)], dtype=float).reshape(-1, 2)
        (a, b), out = _frame(shown_facts, keep_a, frame, home)
        fig.update_xaxes(range=[a[0], b[0]], **rc)
        fig.update_yaxes(range=[a[1], b[1]], **rc)
        # labels: anchors (and, on a shared map, each edit's subject at its unedited point)
        lab_pts = [np.asarray(anchors[x], float).reshape(2) for x in names]
        lab_txt = [f"<b>{roles[x]}: {x}</b>" if roles else f"<b>{x}</b>" for x in names]
        if not facet:
            lab_pts += [np.asarray(e["pre"], float).reshape(2) for e in pe]
            lab_txt += [f"<i>{e['label']}</i>" for e in pe]
        plain = [t.replace("<b>", "").replace("</b>", "").replace("<i>", "").replace("</i>", "")
                 for t in lab_txt]
        spots = place_labels(lab_pts, plain, keep_a, emb[sel_all],
                             ((a[0], b[0]), (a[1], b[1])), panel_px, fs)
        for p, t, sp in zip(lab_pts, lab_txt, spots):
            sp = {kk: v for kk, v in sp.items() if kk != "box"}
            fig.add_annotation(x=p[0], y=p[1], xref=xr, yref=yr, text=t, **sp,
                               font=dict(size=fs, color="#222222" if "<b>" in t else "#444444"),
                               bgcolor="rgba(255,255,255,0.75)", borderpad=1)
        note = f"{out} of {int(sel_all.sum())} facts outside the frame" if out else ""
        if facet:  # under the panel's title (the subplot titles are the first annotations)
            fig.layout.annotations[k - 1].text += (
                f"<br><span style='font-size:{fs - 2}px;color:#666666'>{note or '&nbsp;'}</span>")
        elif note:  # above the plot's top right corner
            fig.add_annotation(text=note, xref="x domain", yref="y domain", x=1, y=1,
                               xanchor="right", yanchor="bottom", showarrow=False,
                               font=dict(size=fs - 2, color="#666666"))
        if row == nrow:
            fig.update_xaxes(title=axes[0], **rc)
        if col == 1:
            fig.update_yaxes(title=axes[1], **rc)
    if facet:
        fig.update_annotations(selector=dict(xref="paper"), font_size=fs)
    fig.update_xaxes(zeroline=False)
    fig.update_yaxes(zeroline=False)
    style(fig, title=title, height=plot_h, top=(2 * fs + 14) if facet else fs + 6)
    fig.update_layout(legend_itemsizing="constant")  # fact dots legible in the legend
    return fig


def latent_map(lmap, bank, layer: int, anchors: dict | None = None,
               moves: list[dict] | None = None, top_objects: int = 8,
               frame: float | None = 1.0, facet: bool = False,
               title: str | None = None) -> go.Figure:
    """The latent map of a reference bank: its facts (the points ``lmap`` was fitted on, in
    ``bank`` order) coloured by object (the ``top_objects`` most frequent; others grey),
    anchors as stars, edits as arrows from pre to post; framed like :func:`edit_map`
    (outliers counted and left out of the frame), and with ``facet=True`` one panel per
    edit.

    ``moves``: dicts with ``label``, ``method``, ``pre`` and ``post`` (``[d]`` streams at
    ``layer``), e.g. from :func:`steamviz.measure.integration.last_streams` before/after an edit;
    moves with the same label are one edit (``new``/``old`` object names optional).
    """
    edits: dict = {}
    for mv in moves or []:
        e = edits.setdefault(mv["label"], dict(
            label=mv["label"], new=mv.get("new"), old=mv.get("old"),
            pre=lmap.transform(np.asarray(mv["pre"])[None])[0], post={}))
        e["post"][mv.get("method", "rome")] = lmap.transform(np.asarray(mv["post"])[None])[0]
    anchor_xy = {name: lmap.transform(np.asarray(a.phi[layer])[None])[0]
                 for name, a in (anchors or {}).items()}
    texts = [getattr(f, "prompt", str(f)) for f in getattr(bank, "facts", [])] or None
    return _map_figure(lmap.embedding, bank.objects, anchor_xy, list(edits.values()),
                       _map_axes(lmap, layer), texts=texts, title=title, frame=frame,
                       facet=facet, top_objects=top_objects)


def edit_map(lmap, streams, objects: Sequence[str], layer: int, edits: Sequence[dict],
             anchors: dict | None = None, title: str | None = None,
             frame: float | None = 1.0, facet: bool = False, cols: int = 2,
             texts: Sequence[str] | None = None) -> go.Figure:
    """A latent map framed on the edits' neighbourhood: the unedited model's streams of
    reference facts (``streams`` ``[n, d]`` at ``layer``, the fit of ``lmap``; ``objects``
    names each one's object), anchors as stars (labelled), and each edit drawn as arrows
    from its unedited stream (open circle) to each method's edited stream.

    ``edits``: dicts with ``label``, ``pre`` (``[d]``) and ``post`` (``{method: [d]}``),
    optionally ``new`` and ``old`` (object names). Fit ``lmap`` on the neighbourhood only
    (the old and new objects' facts), so far clusters do not squash the edits into a
    corner. ``frame``: each panel spans every anchor and edit point it shows and the facts
    that are not outliers: a fact farther from its object's anchor than Tukey's fence
    (Q3 + ``frame`` x IQR of those distances) is left outside the frame, and the number of
    such facts is noted (None: everything is framed). ``facet``: one panel per edit (``cols`` per
    row), each showing the facts and anchors of that edit's ``new`` and ``old`` objects
    (all facts when the edit does not name them), framed on its own neighbourhood.
    ``texts``: hover text per fact (e.g. its prompt).
    """
    emb = lmap.transform(np.asarray(streams))
    moved = [dict(e, pre=lmap.transform(np.asarray(e["pre"])[None])[0],
                  post={m: lmap.transform(np.asarray(h)[None])[0] for m, h in e["post"].items()})
             for e in edits]
    anchor_xy = {name: lmap.transform(np.asarray(phi)[None])[0]
                 for name, phi in (anchors or {}).items()}
    return _map_figure(emb, objects, anchor_xy, moved, _map_axes(lmap, layer), texts=texts,
                       title=title, frame=frame, facet=facet, cols=cols)
