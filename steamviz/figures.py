"""Figures (plotly). Each function returns a ``go.Figure``; wrap it in
``go.FigureWidget(fig)`` for live updates in JupyterLab. :func:`export` writes HTML always
and PNG / PDF / SVG through kaleido (driven by a system Chromium).

>>> fig = layer_cosine(df)                     # df: sweep rows      # doctest: +SKIP
>>> export(fig, "runs/lam/figures/cosine", formats=("html", "png", "pdf", "svg"))  # doctest: +SKIP

Style (:data:`STYLE`, applied by :func:`style`): in a notebook a figure fills the width of
the output area (``autosize``; no fixed pixel width); fixed one- and two-column paper sizes
are set only by :func:`export` (``size=``) or an explicit ``style(fig, "one_column")``.
Each method has one colour and one label, read from its row of the editor registry
(:data:`steamviz.editors.DISPLAY`, the colour-blind-safe Okabe-Ito palette); lambda values of
a STEAM method are shades of its colour. Bands are translucent with a line per method,
legends run horizontally above the plot, below the strip the plotly modebar uses, and every
axis has numbers and a title.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

STYLE = dict(
    font="Arial, Helvetica, sans-serif",
    font_size=12,
    height=330,  # px: a notebook figure's plot region (axes included, legend above it)
    one_column=(340, 260),  # export sizes, px (100 px per inch: 3.4 in x 2.6 in)
    two_column=(700, 330),
    legend_width=700,  # px a notebook figure is assumed to span when its legend is laid out
    modebar=30,  # px kept free above the legend in notebooks: the plotly modebar's strip
    band_alpha=0.12,
    # facts of the latent maps, coloured by object: Paul Tol's "light" scheme without its
    # blues and oranges, so no cluster takes the colour of a method
    object_colors=("#44BB99", "#FFAABB", "#BBCC33", "#EEDD88", "#AAAA00", "#99DDFF",
                   "#DDAA77", "#CC99CC"),
    other_facts="#DDDDDD",
)


def _size(width: str | None, plot_height: int | None) -> tuple[int | None, int]:
    """(figure width or None, plot-region height) for a named size."""
    if width is None:
        return None, plot_height or STYLE["height"]
    if width not in ("one_column", "two_column"):
        raise ValueError(f"width must be None, 'one_column' or 'two_column', not {width!r}")
    w, h = STYLE[width]
    if plot_height is None:
        return w, h
    if width == "two_column":
        return w, plot_height
    return w, max(h, round(plot_height * w / STYLE["two_column"][0]))


def _legend_rows(fig: go.Figure, width: float) -> int:
    """How many rows the horizontal legend of ``fig`` takes at ``width`` px (an estimate
    from its entries' lengths: plotly wraps a horizontal legend at the plot's width)."""
    names = [t.name for t in fig.data
             if t.showlegend is not False and t.name and getattr(t, "type", "") != "heatmap"]
    if len(names) < 2 and not fig.layout.showlegend:
        return 0
    fs = STYLE["font_size"] - 1
    rows, x = 1, 0.0
    for n in names:
        w = 48 + 0.58 * fs * len(n)
        if x and x + w > width:
            rows, x = rows + 1, 0.0
        x += w
    return rows


def style(fig: go.Figure, width: str | None = None, title: str | None = None,
          height: int | None = None, top: int = 0) -> go.Figure:
    """Apply the paper style to ``fig`` (in place; returned).

    ``width``: None (notebooks: ``autosize``, the width of the output area), or
    ``"one_column"`` / ``"two_column"`` (the fixed sizes of :data:`STYLE`, for export).
    ``height``: the plot region's height in px at two-column width (default
    ``STYLE["height"]``; kept in the figure, so styling again at another size keeps the
    figure's proportions). The legend runs horizontally above the plot region; the figure
    grows by its height (and, in notebooks, by the modebar's strip above it). ``top``: px
    of titles drawn above the plot region (subplot titles).
    """
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    height = height or meta.get("plot_height")
    top = top or meta.get("top", 0)
    title = title if title is not None else meta.get("title")
    meta.update(plot_height=height, top=top, title=title)
    w, h = _size(width, height)
    fs = STYLE["font_size"]
    rows = _legend_rows(fig, (w or STYLE["legend_width"]) - 80)
    legend_h = rows * round(2.4 * fs)  # px per row, as plotly draws them (~29 at 12 px)
    strip = STYLE["modebar"] if w is None else 6
    title_h = fs + 16 if title else 0
    t = strip + title_h + legend_h + top + (6 if rows else 0)
    total = h + t
    fig.update_layout(
        template="simple_white", autosize=w is None, width=w, height=total,
        font=dict(family=STYLE["font"], size=fs),
        title=dict(text=title, x=0, xref="paper", y=1 - strip / total, yref="container",
                   yanchor="top", font=dict(size=fs + 1)) if title else None,
        margin=dict(l=64, r=24, t=t, b=52, autoexpand=True),
        showlegend=rows > 0,
        legend=dict(orientation="h", x=0, xanchor="left", xref="paper",
                    y=1 - (strip + title_h) / total, yanchor="top", yref="container",
                    font=dict(size=fs - 1), itemwidth=40,
                    bgcolor="rgba(255,255,255,0)"),
        hoverlabel=dict(font=dict(size=fs - 1)),
        meta=meta,
    )
    fig.update_xaxes(showticklabels=True, ticks="outside", automargin=True)
    fig.update_yaxes(showticklabels=True, ticks="outside", automargin=True)
    return fig


# --- methods: label and colour from the editor registry -----------------------------------

def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v) in ("nan", "None")


def label(method: str, lam=None, centered=None) -> str:
    """A method's legend label: its registry label, or for a lambda of a STEAM method its
    short label and the value ("STEAM λ=50", "STEAM λ=50 centred")."""
    from .editors import display

    d = display(method)
    if _nan(lam) or not str(method).lower().startswith("steam"):
        return d.label
    c = " centred" if centered in (True, "True") else ""
    return f"{d.short} λ={float(lam):g}{c}"


def _mix(hex_color: str, t: float) -> str:
    """``hex_color`` mixed toward white (t < 0) or black (t > 0) by |t|."""
    rgb = np.array([int(hex_color.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)
    rgb = rgb + (255 - rgb) * -t if t < 0 else rgb * (1 - t)
    return "#" + "".join(f"{int(round(v)):02X}" for v in np.clip(rgb, 0, 255))


def color(method: str, shade: int = 0, of: int = 1) -> str:
    """A method's colour from its registry row; ``shade`` of ``of`` variants (e.g. the
    lambdas of a STEAM method, lowest first) runs from a lighter to a darker version."""
    from .editors import display

    base = display(method).color
    if of <= 1:
        return base
    t = np.linspace(-0.4, 0.4, of)[min(shade, of - 1)]
    return _mix(base, float(t))


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha:g})"


def _point_key(method, lam, centered) -> tuple:
    return (str(method), None if _nan(lam) else float(lam), str(centered in (True, "True")))


def _order(points) -> list:
    """Grid points in reading order: methods in registry order (the unedited model first),
    then lambda ascending."""
    from .editors import DISPLAY

    rank = {m: i for i, m in enumerate(DISPLAY)}

    def key(p):
        m, lam, cen = _point_key(*p[:3])
        return (rank.get(m, len(rank)), m, lam if lam is not None else -1.0, cen)

    return sorted(points, key=key)


def group_colors(points) -> dict:
    """``(method, lam, centered)`` -> colour: one per method, its lambdas as shades (lowest
    lambda lightest). Keys are canonical (:func:`_point_key`)."""
    by: dict = {}
    for p in points:
        k = _point_key(*p)
        by.setdefault(k[0], set()).add(k)
    out = {}
    for m, ks in by.items():
        ks = sorted(ks, key=lambda k: (k[1] if k[1] is not None else -1.0, k[2]))
        for i, k in enumerate(ks):
            out[k] = color(m, i, len(ks))
    return out


def _legend_only(name: str, dash: str = "solid", col: str = "#555555",
                 mode: str = "lines", marker: dict | None = None) -> go.Scatter:
    """A legend entry that draws nothing (explains a line style shared by many traces)."""
    return go.Scatter(x=[None], y=[None], mode=mode, name=name, hoverinfo="skip",
                      line=dict(color=col, dash=dash, width=2), marker=marker or {})


def _band(x, lo, hi, col: str, name: str) -> go.Scatter:
    """A translucent 95% band with a thin edge in the method's colour (bands of several
    methods stay apart where they overlap)."""
    return go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[hi, lo[::-1]], fill="toself",
                      fillcolor=rgba(col, STYLE["band_alpha"]),
                      line=dict(width=0.8, color=rgba(col, 0.55)),
                      hoverinfo="skip", showlegend=False, legendgroup=name,
                      name=f"{name} 95% CI")


def line_widths(n: int) -> list[float]:
    """Line widths of ``n`` lines drawn in order: earlier ones a little wider, so a line
    that another covers exactly still shows at its edges."""
    return [2.0 + 1.6 * (n - 1 - i) / max(n - 1, 1) for i in range(n)] if n > 1 else [2.2]


def _align_band(fig: go.Figure, align_layers) -> None:
    if align_layers:
        fig.add_vrect(x0=min(align_layers), x1=max(align_layers), fillcolor="#BBBBBB",
                      opacity=0.18, line_width=0, layer="below",
                      annotation_text="STEAM's alignment layers", annotation_position="top left",
                      annotation_font=dict(size=STYLE["font_size"] - 2, color="#666666"))


LAYER_AXIS = "layer (residual stream; 0 = embeddings)"


def _layers_matrix(df: pd.DataFrame, col: str) -> np.ndarray:
    vals = [json.loads(v) if isinstance(v, str) else v for v in df[col]]
    return np.array([v for v in vals if v is not None], dtype=float)


def cos_title(col: str, extra: str = "") -> str:
    """A two-line axis title (short enough for one column): what, then how measured."""
    what = "centred cosine" if "centered" in col else "cosine"
    how = "held out" if "trained" not in col else "rewrite prompt"
    return f"{what} to anchor<br>({how}{'; ' + extra if extra else ''})"


def layer_cosine(df: pd.DataFrame, col: str = "cos_centered_layers",
                 align_layers: Sequence[int] | None = None) -> go.Figure:
    """Per-layer cosine to the new object's anchor, one line per method / lambda, with a
    95% confidence band over edits (normal approximation); dashed, the same cosine to the
    control anchors (other objects, same relations) when ``df`` has it -- a layer where the
    two lines meet says nothing about the new object."""
    fig = go.Figure()
    groups = {k: g for k, g in df.groupby(["method", "lam", "centered"], dropna=False,
                                          sort=False)}
    order = _order(list(groups))
    colors = group_colors(order)
    ctl = col.replace("_layers", "_control_layers")
    bands, lines, dashes = [], [], []
    for key in order:
        g = groups[key]
        M = _layers_matrix(g, col)
        if M.size == 0:
            continue
        x = np.arange(M.shape[1])
        mean = M.mean(0)
        ci = 1.96 * M.std(0, ddof=1) / np.sqrt(len(M)) if len(M) > 1 else np.zeros_like(mean)
        name = label(*key)
        c = colors[_point_key(*key)]
        bands.append(_band(x, mean - ci, mean + ci, c, name))
        lines.append(go.Scatter(x=x, y=mean, mode="lines", name=name, legendgroup=name,
                                line=dict(color=c)))
        C = _layers_matrix(g, ctl) if ctl in g.columns else np.zeros((0,))
        if C.size:
            dashes.append(go.Scatter(x=np.arange(C.shape[1]), y=C.mean(0), mode="lines",
                                     name=f"{name}: control anchors", legendgroup=name,
                                     showlegend=False, line=dict(color=c, width=1.5, dash="dash")))
    for t, w in zip(lines, line_widths(len(lines))):
        t.line.width = w
    fig.add_traces(bands + dashes + lines)  # bands below every line
    if dashes:
        fig.add_trace(_legend_only("dashed: control anchors", "dash"))
    _align_band(fig, align_layers)
    fig.update_xaxes(title=LAYER_AXIS)
    fig.update_yaxes(title=cos_title(col, "mean ± 95% CI"))
    return style(fig)


def paired_layer_difference(df: pd.DataFrame, col: str = "cos_centered_layers",
                            baseline: str = "rome", align_layers: Sequence[int] | None = None,
                            n_boot: int = 2000, unedited: bool = False) -> go.Figure:
    """Per layer, the paired difference (point - ``baseline``) of a per-layer metric over the
    same edits, with its bootstrap 95% band, and -- dashed -- the same difference measured
    against the control anchors (``col`` with ``_control``): where both move alike, the
    change is not specific to the new object. Integration columns are held out.
    ``unedited``: also the unedited model minus the baseline (left out by default: it is
    the edit itself, on another scale than a difference between editors)."""
    from .compare import paired_layers

    if not unedited:
        df = df[df.method != "unedited"]
    ctl_col = col.replace("_layers", "_control_layers")
    main = paired_layers(df, col, baseline=baseline, n_boot=n_boot)
    ctl = (paired_layers(df, ctl_col, baseline=baseline, n_boot=n_boot)
           if ctl_col in df.columns else pd.DataFrame())
    fig = go.Figure()
    fig.add_hline(y=0, line=dict(color="#999999", width=1))
    what = "centred cosine" if "centered" in col else col.replace("_layers", "")
    fig.update_xaxes(title=LAYER_AXIS)
    fig.update_yaxes(title=f"Δ {what}, method − {label(baseline)}<br>(held out; mean ± 95% CI)")
    if main.empty:
        return style(fig, title=f"no {baseline!r} rows to pair with")
    keys = [c for c in ("method", "lam", "layer", "align_layers", "centered", "batch")
            if c in main.columns]
    parts = [g for _, g in main.groupby(keys, sort=False, dropna=False)]
    pk = [(g.iloc[0]["method"], g.iloc[0].get("lam"), g.iloc[0].get("centered")) for g in parts]
    colors = group_colors(pk)
    rank = {_point_key(*p): i for i, p in enumerate(_order(pk))}
    parts.sort(key=lambda g: rank[_point_key(g.iloc[0]["method"], g.iloc[0].get("lam"),
                                             g.iloc[0].get("centered"))])
    bands, lines, dashes = [], [], []
    for g in parts:
        p = g.iloc[0]
        name = label(p["method"], p.get("lam"), p.get("centered"))
        c = colors[_point_key(p["method"], p.get("lam"), p.get("centered"))]
        x, y = g.layer_index.to_numpy(), g["diff"].to_numpy()
        bands.append(_band(x, g.low.to_numpy(), g.high.to_numpy(), c, name))
        lines.append(go.Scatter(x=x, y=y, mode="lines", name=f"{name} (n={int(g.n.iloc[0])})",
                                legendgroup=name, line=dict(color=c)))
        if not ctl.empty:
            sel = np.ones(len(ctl), bool)
            for k in keys:
                sel &= ctl[k].astype(str).to_numpy() == str(p[k])
            cc = ctl[sel]
            if len(cc):
                dashes.append(go.Scatter(x=cc.layer_index, y=cc["diff"], mode="lines",
                                         name=f"{name}: control anchors", legendgroup=name,
                                         showlegend=False,
                                         line=dict(color=c, width=1.5, dash="dash")))
    for t, w in zip(lines, line_widths(len(lines))):
        t.line.width = w
    fig.add_traces(bands + dashes + lines)
    if dashes:
        fig.add_trace(_legend_only("dashed: vs control anchors", "dash"))
    _align_band(fig, align_layers)
    return style(fig)


def lambda_layer_heatmap(df: pd.DataFrame, col: str = "cos_centered_layers",
                         baseline: str = "rome", method: str = "steam-rome") -> go.Figure:
    """Layer x lambda heatmap of the mean per-layer cosine of ``method`` (STEAM-ROME), minus
    ``baseline``'s (ROME) so colour shows what the alignment term adds."""
    st = df[df.method == method]
    lams = sorted(st.lam.dropna().astype(float).unique())
    rows = [_layers_matrix(st[st.lam.astype(float) == lam], col).mean(0) for lam in lams]
    Z = np.array(rows)
    base = _layers_matrix(df[df.method == baseline], col)
    what = "centred cosine" if "centered" in col else "cosine"
    title = f"{what}<br>to anchor"
    if base.size:
        Z = Z - base.mean(0)[None]
        title = f"Δ {what}<br>vs {label(baseline)}"
    fig = go.Figure(go.Heatmap(z=Z, x=list(range(Z.shape[1])), y=[f"{v:g}" for v in lams],
                               colorscale="RdBu", zmid=0, hovertemplate=(
                                   "layer %{x}, λ=%{y}: %{z:.3f}<extra></extra>"),
                               colorbar=dict(title=dict(text=title, side="top"),
                                             thickness=14, len=1.0)))
    fig.update_xaxes(title=LAYER_AXIS)
    fig.update_yaxes(title=f"λ of {label(method)}", type="category")
    return style(fig, height=max(260, 60 + 34 * len(lams)))


#: readable names of the summary columns
NAMES = {"cos_centered": "centred cosine (held out)", "cos_raw": "cosine (held out)",
         "cos_centered_control": "centred cosine, controls", "knn_share": "kNN share",
         "neighborhood": "neighbourhood", "axis": "old→new axis"}

#: units of the summary columns, for axis titles
UNITS = {"efficacy": "share of prompts", "paraphrase": "share of prompts",
         "neighborhood": "share of prompts", "portability": "share of prompts",
         "fluency": "n-gram entropy, bits", "consistency": "TF-IDF cosine",
         "cos_centered": "centred cosine", "cos_raw": "cosine",
         "cos_centered_control": "centred cosine", "knn_share": "share of neighbours",
         "axis": "old (0) to new (1)", "steps": "steps", "edit_seconds": "s"}


def tradeoff(summary: pd.DataFrame,
             metrics: Sequence[str] = ("efficacy", "portability", "fluency", "cos_centered")
             ) -> go.Figure:
    """Lambda against each metric: a line per method with lambda values (STEAM-ROME), a
    dashed level per other edit method (ROME)."""
    from plotly.subplots import make_subplots

    metrics = [m for m in metrics if m in summary.columns]
    fig = make_subplots(rows=1, cols=len(metrics), horizontal_spacing=0.1,
                        subplot_titles=[NAMES.get(m, m.replace("_", " ")) for m in metrics])
    d = summary.copy()
    d["lam"] = pd.to_numeric(d["lam"], errors="coerce")
    with_lam = [m for m in d.method.unique() if d[d.method == m].lam.notna().any()]
    levels = [m for m in d.method.unique() if m not in with_lam and m != "unedited"]
    for j, m in enumerate(metrics, start=1):
        for meth in with_lam:
            st = d[d.method == meth].sort_values("lam")
            fig.add_trace(go.Scatter(x=st.lam, y=st[m], mode="lines+markers", name=label(meth),
                                     line=dict(color=color(meth), width=2.2),
                                     marker=dict(size=8), showlegend=j == 1,
                                     legendgroup=meth), row=1, col=j)
        for meth in levels:
            v = pd.to_numeric(d[d.method == meth][m], errors="coerce").mean()
            if not pd.isna(v):
                fig.add_hline(y=float(v), line=dict(color=color(meth), dash="dash", width=2),
                              opacity=1, row=1, col=j)
        fig.update_xaxes(title="λ", row=1, col=j)
        fig.update_yaxes(title=UNITS.get(m, ""), row=1, col=j, title_standoff=4)
        if UNITS.get(m, "").startswith("share"):
            fig.update_yaxes(range=[-0.03, 1.03], row=1, col=j)
    for meth in levels:
        fig.add_trace(_legend_only(f"{label(meth)} (dashed level)", "dash", color(meth)))
    fig.update_annotations(font_size=STYLE["font_size"])
    return style(fig, top=STYLE["font_size"] + 12)


def logit_lens(rows: list[dict] | pd.DataFrame, value: str = "prob") -> go.Figure:
    """Heatmap of the logit lens: layers x (method, target) of P or rank."""
    df = pd.DataFrame(rows)
    if "method" not in df.columns:
        df["method"] = "model"
    df["row"] = (df["method"].map(lambda m: label(m)) + ": " + df["token"] + " ("
                 + df["target"] + ")")
    piv = df.pivot_table(index="row", columns="layer", values=value, aggfunc="mean")
    what = "probability<br>(first token)" if value == "prob" else "rank<br>(first token)"
    fig = go.Figure(go.Heatmap(z=piv.values, x=list(piv.columns), y=list(piv.index),
                               colorscale="Viridis",
                               colorbar=dict(title=dict(text=what, side="top"), thickness=14)))
    fig.update_xaxes(title="layer (residual stream, read out through the final norm)")
    fig.update_yaxes(title="method: token (target)")
    return style(fig, height=max(220, 90 + 26 * len(piv)))


# --- latent maps --------------------------------------------------------------------------

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
    ``layer``), e.g. from :func:`steamviz.integration.last_streams` before/after an edit;
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
                                     name=label(method) if target == "new"
                                     else f"{label(method)}: P(old object)",
                                     legendgroup=str(method), showlegend=target == "new",
                                     hovertemplate=f"{label(method)}, P({target} object), "
                                                   "layer %{x}: %{y:.2g}<extra></extra>",
                                     line=dict(color=color(method), dash=dash, width=2.2)))
    fig.add_trace(_legend_only("solid: new object"))
    fig.add_trace(_legend_only("dashed: old object", "dash"))
    fig.update_xaxes(title="layer (residual stream, read out through the final norm)")
    if log:
        fig.update_yaxes(title=f"P(first token) (log; floor {floor:g})",
                         type="log", exponentformat="power")
    else:
        fig.update_yaxes(title="P(first token)", rangemode="tozero")
    return style(fig)


def run_align_layers(df: pd.DataFrame) -> list[int] | None:
    """STEAM's alignment layers of a sweep's rows when every STEAM row has the same ones
    (``"default"`` resolved from the edited layer and the model's depth, which the per-layer
    columns give); None otherwise."""
    from types import SimpleNamespace

    from .steam import default_layers

    st = df[df.method.astype(str).str.startswith("steam")]
    if st.empty or "align_layers" not in st or "layer" not in st:
        return None
    keys = {(str(a), str(v)) for a, v in zip(st.align_layers, st.layer)}
    if len(keys) != 1:
        return None
    al, layer = st.align_layers.iloc[0], st.layer.iloc[0]
    if isinstance(al, str) and al != "default":
        al = json.loads(al)
    if isinstance(al, list):
        return [int(i) for i in al]
    M = _layers_matrix(st.head(1), "cos_centered_layers") if "cos_centered_layers" in st else None
    if M is None or not M.size or _nan(layer):
        return None
    return default_layers(SimpleNamespace(n_layers=M.shape[1] - 1), int(float(layer)))


def sweep_figures(df: pd.DataFrame, log=print) -> dict[str, go.Figure]:
    """Every figure of a sweep's rows that the rows allow (``steamviz figures`` and notebook
    05): name -> figure."""
    from .sweep import summarize

    align = run_align_layers(df)
    made = {"layer_cosine": layer_cosine(df, align_layers=align),
            "tradeoff": tradeoff(summarize(df))}
    if (df.method == "rome").any() and "cos_centered_layers" in df.columns:
        try:
            made["paired_layer_difference"] = paired_layer_difference(df, align_layers=align)
        except ValueError as e:  # e.g. ROME at several edited layers: no single baseline
            log(f"no paired-difference figure: {e}")
    if (df.method == "steam-rome").any() and df.lam.dropna().nunique() >= 1:
        made["lambda_layer_heatmap"] = lambda_layer_heatmap(df)
    return made


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
           scale: float = 2.0, size: str = "two_column") -> list[Path]:
    """Write ``path.<fmt>`` for each format; HTML needs nothing (it keeps the figure's
    responsive width), the others need kaleido and a Chromium browser (``apt-get install
    chromium``; or set ``BROWSER_PATH``) and are drawn at the fixed paper ``size``
    (``"one_column"`` or ``"two_column"``, :data:`STYLE`; ``fig`` itself is not changed).
    Files are written atomically."""
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

    sized = style(go.Figure(fig), size)
    for fmt in static:
        for attempt in range(3):
            try:
                data = pio.to_image(sized, format=fmt, scale=scale)
                break
            except Exception as e:  # kaleido / browser failures
                # kaleido 1.5 now and then evaluates its page script before the page has
                # loaded it ("kaleido_scopes is not defined"); a new attempt draws the figure
                if "kaleido_scopes" in str(e) and attempt < 2:
                    continue
                raise ExportError(f"{fmt.upper()} export failed with browser {browser}: {e}"
                                  ) from e
        out.append(write_bytes(path.with_suffix(f".{fmt}"), data))
    return out
