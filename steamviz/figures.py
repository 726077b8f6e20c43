"""Figures (plotly). Each function returns a ``go.Figure``; wrap it in
``go.FigureWidget(fig)`` for live updates in JupyterLab. :func:`export` writes HTML always
and PNG / PDF / SVG through kaleido (driven by a system Chromium).

>>> fig = layer_cosine(df)                     # df: sweep rows      # doctest: +SKIP
>>> export(fig, "runs/lam/figures/cosine", formats=("html", "png", "pdf", "svg"))  # doctest: +SKIP

Style: :data:`STYLE` (font, sizes for one- and two-column paper layouts), applied by
:func:`style`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

STYLE = dict(
    font="Arial, Helvetica, sans-serif",
    font_size=11,
    one_column=(340, 260),  # px at 100 dpi ~ 3.4 in
    two_column=(700, 320),
    colors={"unedited": "#7f7f7f", "rome": "#d62728", "steam-rome": "#1f77b4",
            "memit": "#ff7f0e", "sake": "#2ca02c", "baft": "#9467bd", "kne": "#8c564b"},
)


def style(fig: go.Figure, width: str = "two_column", title: str | None = None) -> go.Figure:
    w, h = STYLE[width]
    fig.update_layout(
        template="simple_white", width=w, height=h, title=title,
        font=dict(family=STYLE["font"], size=STYLE["font_size"]),
        margin=dict(l=50, r=10, t=40 if title else 10, b=40),
        legend=dict(font=dict(size=STYLE["font_size"] - 1)),
    )
    return fig


def _label(method: str, lam=None, centered=None) -> str:
    if method != "steam-rome" or lam is None or (isinstance(lam, float) and np.isnan(lam)):
        return {"rome": "ROME", "unedited": "unedited", "steam-rome": "STEAM-ROME",
                "memit": "MEMIT", "steam-memit": "STEAM-MEMIT"}.get(method, method)
    c = " centred" if centered in (True, "True") else ""
    return f"STEAM λ={float(lam):g}{c}"


def _color(method: str, i: int = 0) -> str:
    base = STYLE["colors"].get(method, "#333333")
    if method == "steam-rome" and i:
        shades = ["#1f77b4", "#17becf", "#393b79", "#6baed6", "#08519c"]
        return shades[i % len(shades)]
    return base


def _layers_matrix(df: pd.DataFrame, col: str) -> np.ndarray:
    vals = [json.loads(v) if isinstance(v, str) else v for v in df[col]]
    return np.array([v for v in vals if v is not None], dtype=float)


def layer_cosine(df: pd.DataFrame, col: str = "cos_centered_layers",
                 align_layers: Sequence[int] | None = None) -> go.Figure:
    """Per-layer cosine to the new object's anchor, one line per method / lambda, with a
    95% confidence band over edits (normal approximation); dashed, the same cosine to the
    control anchors (other objects, same relations) when ``df`` has it -- a layer where the
    two lines meet says nothing about the new object."""
    fig = go.Figure()
    groups = df.groupby(["method", "lam", "centered"], dropna=False, sort=False)
    for i, ((method, lam, cen), g) in enumerate(groups):
        M = _layers_matrix(g, col)
        if M.size == 0:
            continue
        x = np.arange(M.shape[1])
        mean = M.mean(0)
        ci = 1.96 * M.std(0, ddof=1) / np.sqrt(len(M)) if len(M) > 1 else np.zeros_like(mean)
        name = _label(method, lam, cen)
        color = _color(method, i)
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[mean + ci, (mean - ci)[::-1]],
                                 fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=name,
                                 name=f"{name} 95% CI"))
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=name, legendgroup=name,
                                 line=dict(color=color, width=2)))
        ctl = col.replace("_layers", "_control_layers")
        C = _layers_matrix(g, ctl) if ctl in g.columns else np.zeros((0,))
        if C.size:
            fig.add_trace(go.Scatter(x=np.arange(C.shape[1]), y=C.mean(0), mode="lines",
                                     name=f"{name}: control anchors", legendgroup=name,
                                     line=dict(color=color, width=1.2, dash="dash")))
    if align_layers:
        fig.add_vrect(x0=min(align_layers), x1=max(align_layers), fillcolor="#cccccc",
                      opacity=0.2, line_width=0)
    fig.update_xaxes(title="layer (residual stream)")
    fig.update_yaxes(title="centred cosine to anchor" if "centered" in col else "cosine to anchor")
    return style(fig)


def paired_layer_difference(df: pd.DataFrame, col: str = "cos_centered_layers",
                            baseline: str = "rome", align_layers: Sequence[int] | None = None,
                            n_boot: int = 2000) -> go.Figure:
    """Per layer, the paired difference (point - ``baseline``) of a per-layer metric over the
    same edits, with its bootstrap 95% band, and -- dashed -- the same difference measured
    against the control anchors (``col`` with ``_control``): where both move alike, the
    change is not specific to the new object. Integration columns are held out."""
    from .compare import paired_layers

    ctl_col = col.replace("_layers", "_control_layers")
    main = paired_layers(df, col, baseline=baseline, n_boot=n_boot)
    ctl = (paired_layers(df, ctl_col, baseline=baseline, n_boot=n_boot)
           if ctl_col in df.columns else pd.DataFrame())
    fig = go.Figure()
    fig.add_hline(y=0, line=dict(color="#999999", width=1))
    if main.empty:
        return style(fig, title=f"no {baseline!r} rows to pair with")
    keys = [c for c in ("method", "lam", "layer", "align_layers", "centered", "batch")
            if c in main.columns]
    for i, (_, g) in enumerate(main.groupby(keys, sort=False, dropna=False)):
        p = g.iloc[0]
        name = _label(p["method"], p.get("lam"), p.get("centered"))
        color = _color(p["method"], i)
        x, y = g.layer_index.to_numpy(), g["diff"].to_numpy()
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[g.high, g.low[::-1]],
                                 fill="toself", fillcolor=color, opacity=0.2,
                                 line=dict(width=0), hoverinfo="skip", showlegend=False,
                                 legendgroup=name, name=f"{name} 95% CI"))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{name} (n={int(g.n.iloc[0])})",
                                 legendgroup=name, line=dict(color=color, width=2)))
        if not ctl.empty:
            sel = np.ones(len(ctl), bool)
            for k in keys:
                sel &= ctl[k].astype(str).to_numpy() == str(p[k])
            c = ctl[sel]
            if len(c):
                fig.add_trace(go.Scatter(x=c.layer_index, y=c["diff"], mode="lines",
                                         name=f"{name}: control anchors", legendgroup=name,
                                         line=dict(color=color, width=1.5, dash="dash")))
    if align_layers:
        fig.add_vrect(x0=min(align_layers), x1=max(align_layers), fillcolor="#cccccc",
                      opacity=0.2, line_width=0)
    fig.update_xaxes(title="layer (residual stream)")
    what = "centred cosine" if "centered" in col else col.replace("_layers", "")
    fig.update_yaxes(title=f"Δ {what} vs {baseline.upper()} (held out)")
    return style(fig)


def lambda_layer_heatmap(df: pd.DataFrame, col: str = "cos_centered_layers",
                         baseline: str = "rome") -> go.Figure:
    """Layer x lambda heatmap of the mean per-layer cosine of STEAM-ROME, minus ``baseline``'s
    (ROME) so colour shows what the alignment term adds."""
    st = df[df.method == "steam-rome"]
    lams = sorted(st.lam.dropna().unique())
    rows = [_layers_matrix(st[st.lam == lam], col).mean(0) for lam in lams]
    Z = np.array(rows)
    base = _layers_matrix(df[df.method == baseline], col)
    title = "cosine"
    if base.size:
        Z = Z - base.mean(0)[None]
        title = f"Δ cosine vs {baseline.upper()}"
    fig = go.Figure(go.Heatmap(z=Z, x=list(range(Z.shape[1])), y=[f"{v:g}" for v in lams],
                               colorscale="RdBu", zmid=0, colorbar=dict(title=title)))
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="λ", type="category")
    return style(fig)


def tradeoff(summary: pd.DataFrame,
             metrics: Sequence[str] = ("efficacy", "portability", "fluency", "cos_centered")
             ) -> go.Figure:
    """Lambda against each metric (STEAM-ROME points as lines; ROME as a dashed level)."""
    from plotly.subplots import make_subplots

    metrics = [m for m in metrics if m in summary.columns]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics,
                        horizontal_spacing=0.08)
    st = summary[summary.method == "steam-rome"].copy()
    st["lam"] = st["lam"].astype(float)
    st = st.sort_values("lam")
    ro = summary[summary.method == "rome"]
    for j, m in enumerate(metrics, start=1):
        fig.add_trace(go.Scatter(x=st.lam, y=st[m], mode="lines+markers", name="STEAM-ROME",
                                 line=dict(color=_color("steam-rome")), showlegend=j == 1,
                                 legendgroup="steam"), row=1, col=j)
        if len(ro):
            fig.add_hline(y=float(ro[m].mean()), line=dict(color=_color("rome"), dash="dash"),
                          row=1, col=j)
        fig.update_xaxes(title="λ", row=1, col=j)
    return style(fig)


def logit_lens(rows: list[dict] | pd.DataFrame, value: str = "prob") -> go.Figure:
    """Heatmap of the logit lens: layers x (method, target) of P or rank."""
    df = pd.DataFrame(rows)
    if "method" not in df.columns:
        df["method"] = "model"
    df["row"] = df["method"] + ": " + df["token"] + " (" + df["target"] + ")"
    piv = df.pivot_table(index="row", columns="layer", values=value, aggfunc="mean")
    fig = go.Figure(go.Heatmap(z=piv.values, x=list(piv.columns), y=list(piv.index),
                               colorscale="Viridis", colorbar=dict(title=value)))
    fig.update_xaxes(title="layer")
    return style(fig)


def latent_map(lmap, bank, layer: int, anchors: dict | None = None,
               moves: list[dict] | None = None, top_objects: int = 12) -> go.Figure:
    """The latent map: reference facts coloured by object (``top_objects`` most frequent,
    others grey), anchors as stars, edits as arrows from pre to post.

    ``moves``: dicts with ``label``, ``method``, ``pre`` and ``post`` (``[d]`` streams at
    ``layer``), e.g. from :func:`steamviz.integration.last_streams` before/after an edit.
    """
    emb = lmap.embedding
    objs = pd.Series(bank.objects)
    top = list(objs.value_counts().index[:top_objects])
    fig = go.Figure()
    other = ~objs.isin(top).values
    fig.add_trace(go.Scattergl(x=emb[other, 0], y=emb[other, 1], mode="markers",
                               marker=dict(size=4, color="#dddddd"), name="other facts",
                               text=[f.prompt for f, o in zip(bank.facts, other) if o],
                               hoverinfo="text"))
    for o in top:
        sel = (objs == o).values
        fig.add_trace(go.Scattergl(x=emb[sel, 0], y=emb[sel, 1], mode="markers",
                                   marker=dict(size=5), name=o, legendgroup=o,
                                   text=[f.prompt for f, s in zip(bank.facts, sel) if s],
                                   hoverinfo="text"))
    for name, a in (anchors or {}).items():
        xy = lmap.transform(a.phi[layer][None])
        fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers+text", text=[name],
                                 textposition="top center", name=f"anchor {name}",
                                 marker=dict(symbol="star", size=14, color="black",
                                             line=dict(color="white", width=1))))
    for mv in moves or []:
        pre = lmap.transform(np.asarray(mv["pre"])[None])[0]
        post = lmap.transform(np.asarray(mv["post"])[None])[0]
        color = _color(mv.get("method", "rome"))
        fig.add_trace(go.Scatter(x=[pre[0], post[0]], y=[pre[1], post[1]], mode="markers",
                                 marker=dict(size=[7, 11], color=color,
                                             symbol=["circle-open", "circle"]),
                                 name=f"{mv['label']} ({_label(mv.get('method', ''))})",
                                 legendgroup="edits"))
        fig.add_annotation(x=post[0], y=post[1], ax=pre[0], ay=pre[1], xref="x", yref="y",
                           axref="x", ayref="y", showarrow=True, arrowhead=2, arrowwidth=1.5,
                           arrowcolor=color)
    fig.update_xaxes(title=f"{lmap.method.upper()} 1", showticklabels=False)
    fig.update_yaxes(title=f"{lmap.method.upper()} 2", showticklabels=False)
    return style(fig)


def edit_map(lmap, streams, objects: Sequence[str], layer: int, edits: Sequence[dict],
             anchors: dict | None = None, title: str | None = None,
             frame: float | None = 0.05) -> go.Figure:
    """A latent map framed on the edits' neighbourhood: the unedited model's streams of
    reference facts (``streams`` ``[n, d]`` at ``layer``, the fit of ``lmap``; ``objects``
    names each one's object), anchors as stars, and each edit drawn as arrows from its
    unedited stream to each method's edited stream.

    ``edits``: dicts with ``label``, ``pre`` (``[d]``) and ``post`` (``{method: [d]}``). Fit
    ``lmap`` on the neighbourhood only (the old and new objects' facts and the edit's
    relation), so far clusters do not squash the edits into a corner. ``frame``: the axes span
    the facts between the ``frame`` and ``1 - frame`` quantiles plus every anchor and edit
    point (None: everything); the number of facts left outside is noted in the figure.
    """
    emb = lmap.transform(np.asarray(streams))
    objs = pd.Series(list(objects))
    fig = go.Figure()
    keep = [emb]
    shown_a: set = set()
    for o in objs.value_counts().index:
        sel = (objs == o).to_numpy()
        fig.add_trace(go.Scatter(x=emb[sel, 0], y=emb[sel, 1], mode="markers",
                                 marker=dict(size=6, opacity=0.55), name=f"facts: {o}",
                                 legendgroup=o))
    for name, phi in (anchors or {}).items():
        xy = lmap.transform(np.asarray(phi)[None])
        keep.append(xy)
        fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers+text",
                                 text=[f"<b>{name}</b>"], textposition="top right",
                                 textfont=dict(size=STYLE["font_size"] - 1), name="anchor",
                                 legendgroup="anchor", showlegend="anchor" not in shown_a,
                                 marker=dict(symbol="star", size=13, color="black",
                                             line=dict(color="white", width=1))))
        shown_a.add("anchor")
    shown = set()
    for e in edits:
        pre = lmap.transform(np.asarray(e["pre"])[None])[0]
        keep.append(pre[None])
        fig.add_trace(go.Scatter(x=[pre[0]], y=[pre[1]], mode="markers+text",
                                 text=[f"<i>{e['label']}</i>"], textposition="bottom center",
                                 textfont=dict(size=STYLE["font_size"] - 2, color="#555555"),
                                 name="unedited (edit's subject)",
                                 legendgroup="unedited", showlegend="unedited" not in shown,
                                 marker=dict(size=9, symbol="circle-open", color="black")))
        shown.add("unedited")
        for method, h in e["post"].items():
            xy = lmap.transform(np.asarray(h)[None])[0]
            keep.append(xy[None])
            color = _color(method)
            fig.add_trace(go.Scatter(x=[xy[0]], y=[xy[1]], mode="markers", name=_label(method),
                                     legendgroup=method, showlegend=method not in shown,
                                     marker=dict(size=9, color=color)))
            shown.add(method)
            fig.add_annotation(x=xy[0], y=xy[1], ax=pre[0], ay=pre[1], xref="x", yref="y",
                               axref="x", ayref="y", showarrow=True, arrowhead=2,
                               arrowwidth=1.5, arrowcolor=color, opacity=0.9)
    fig.update_xaxes(title=f"{lmap.method.upper()} 1 (layer {layer})", showticklabels=False)
    fig.update_yaxes(title=f"{lmap.method.upper()} 2", showticklabels=False)
    if frame is not None and len(emb) > 10:
        lo, hi = np.quantile(emb, frame, axis=0), np.quantile(emb, 1 - frame, axis=0)
        pts = np.concatenate([np.clip(emb, lo, hi)] + keep[1:])
        a, b = pts.min(0), pts.max(0)
        pad = 0.08 * (b - a)
        a, b = a - pad, b + pad
        out = int((~((emb >= a) & (emb <= b)).all(1)).sum())
        fig.update_xaxes(range=[a[0], b[0]])
        fig.update_yaxes(range=[a[1], b[1]])
        if out:
            fig.add_annotation(text=f"{out} of {len(emb)} facts outside the frame",
                               xref="paper", yref="paper", x=1, y=0, xanchor="right",
                               yanchor="bottom", showarrow=False,
                               font=dict(size=STYLE["font_size"] - 2, color="#777777"))
    fig = style(fig, title=title)
    fig.update_layout(height=460)  # a map wants room; the legend lists objects and methods
    return fig


def logit_lens_lines(rows: list[dict] | pd.DataFrame, log: bool = True,
                     floor: float = 1e-10) -> go.Figure:
    """The logit lens as lines: per layer, the mean probability of the new object's first
    token (solid) and the old object's (dashed), one colour per method; ``log``: a log
    axis (values below ``floor`` drawn at ``floor``), where the layer at which an object
    starts to rise shows. ``rows``: dicts with ``method``, ``layer``, ``target``
    (``"new"``/``"old"``), ``prob``."""
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for method, g in df.groupby("method", sort=False):
        for target, dash in (("new", "solid"), ("old", "dash")):
            m = g[g.target == target].groupby("layer").prob.mean()
            if m.empty:
                continue
            if log:
                m = m.clip(lower=floor)
            fig.add_trace(go.Scatter(x=m.index, y=m.values, mode="lines",
                                     name=f"{_label(method)}: P({target} object)",
                                     line=dict(color=_color(method), dash=dash, width=2)))
    fig.update_xaxes(title="layer (residual stream, read out through the final norm)")
    if log:
        fig.update_yaxes(title=f"probability (first token; log, floor {floor:g})",
                         type="log", exponentformat="power")
    else:
        fig.update_yaxes(title="probability (first token)", rangemode="tozero")
    return style(fig)


class ExportError(RuntimeError):
    pass


def find_browser() -> str | None:
    p = os.environ.get("BROWSER_PATH")
    if p and Path(p).exists():
        return p
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        w = shutil.which(name)
        if w:
            return w
    return None


def export(fig: go.Figure, path, formats: Sequence[str] = ("html", "png", "pdf", "svg"),
           scale: float = 2.0) -> list[Path]:
    """Write ``path.<fmt>`` for each format; HTML needs nothing, the others need kaleido and
    a Chromium browser (``apt-get install chromium``; or set ``BROWSER_PATH``). Files are
    written atomically."""
    from .io import write_bytes, write_text

    path = Path(path)
    out = []
    static = [f for f in formats if f != "html"]
    if "html" in formats:
        out.append(write_text(path.with_suffix(".html"),
                              fig.to_html(include_plotlyjs="cdn", full_html=True)))
    if not static:
        return out
    browser = find_browser()
    if browser is None:
        raise ExportError(
            "PNG/PDF/SVG export needs a Chromium browser for kaleido and none was found. "
            "Fix: `apt-get install chromium` (Debian/Ubuntu) or set BROWSER_PATH to a "
            "Chrome/Chromium binary. HTML export works without it."
        )
    os.environ.setdefault("BROWSER_PATH", browser)
    import plotly.io as pio

    for fmt in static:
        try:
            data = pio.to_image(fig, format=fmt, scale=scale)
        except Exception as e:  # kaleido / browser failures
            raise ExportError(f"{fmt.upper()} export failed with browser {browser}: {e}") from e
        out.append(write_bytes(path.with_suffix(f".{fmt}"), data))
    return out
