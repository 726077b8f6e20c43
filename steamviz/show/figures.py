"""Figures (plotly). Each function returns a ``go.Figure``; wrap it in
``go.FigureWidget(fig)`` for live updates in JupyterLab. :func:`export` writes HTML always
and PNG / PDF / SVG through kaleido (driven by a system Chromium).

>>> fig = layer_cosine(df)                     # df: sweep rows      # doctest: +SKIP
>>> export(fig, "runs/lam/figures/cosine", formats=("html", "png", "pdf", "svg"))  # doctest: +SKIP

Style (:data:`STYLE`, applied by :func:`style`): in a notebook a figure fills the width of
the output area (``autosize``; no fixed pixel width); fixed one- and two-column paper sizes
are set only by :func:`export` (``size=``) or an explicit ``style(fig, "one_column")``.
Each method has one colour and one label, read from its row of the editor registry
(:data:`steamviz.edit.editors.DISPLAY`, the colour-blind-safe Okabe-Ito palette); lambda values of
a STEAM method are shades of its colour. Bands are translucent with a line per method,
legends run horizontally above the plot, below the strip the plotly modebar uses, and every
axis has numbers and a title.
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

from .maps import edit_map, latent_map, place_labels  # noqa: F401 (re-exported)
from .style import (  # noqa: F401 (re-exported: figures.label, figures.color, ...)
    STYLE,
    color,
    group_colors,
    is_nan,
    label,
    method_key,
    ordered_points,
    rgba,
    style,
)


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
    order = ordered_points(list(groups))
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
        c = colors[method_key(*key)]
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
                            baseline: str | None = None, align_layers: Sequence[int] | None = None,
                            n_boot: int = 2000, unedited: bool = False) -> go.Figure:
    """Per layer, the paired difference (point - ``baseline``) of a per-layer metric over the
    same edits, with its bootstrap 95% band, and -- dashed -- the same difference measured
    against the control anchors (``col`` with ``_control``): where both move alike, the
    change is not specific to the new object. Integration columns are held out.
    ``unedited``: also the unedited model minus the baseline (left out by default: it is
    the edit itself, on another scale than a difference between editors)."""
    from ..measure.compare import paired_layers

    baseline = baseline or _pair(df)[1]
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
    keys = [c for c in ("method", "lam", "block", "align_layers", "centered", "batch")
            if c in main.columns]
    parts = [g for _, g in main.groupby(keys, sort=False, dropna=False)]
    pk = [(g.iloc[0]["method"], g.iloc[0].get("lam"), g.iloc[0].get("centered")) for g in parts]
    colors = group_colors(pk)
    rank = {method_key(*p): i for i, p in enumerate(ordered_points(pk))}
    parts.sort(key=lambda g: rank[method_key(g.iloc[0]["method"], g.iloc[0].get("lam"),
                                             g.iloc[0].get("centered"))])
    bands, lines, dashes = [], [], []
    for g in parts:
        p = g.iloc[0]
        name = label(p["method"], p.get("lam"), p.get("centered"))
        c = colors[method_key(p["method"], p.get("lam"), p.get("centered"))]
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


def _pair(df: pd.DataFrame) -> tuple[str, str]:
    """The run's aligned method (STEAM-ROME) and the method it extends (ROME), by the
    registry (:func:`steamviz.edit.editors.aligned`)."""
    from ..edit.editors import aligned

    pair = aligned(df.method.unique())
    if pair is None:
        raise ValueError("no method with an alignment strength (lambda) in these rows")
    if pair[1] is None:
        raise ValueError(f"{pair[0]!r} extends no other method; pass baseline=...")
    return pair


def lambda_layer_heatmap(df: pd.DataFrame, col: str = "cos_centered_layers",
                         baseline: str | None = None, method: str | None = None) -> go.Figure:
    """Layer x lambda heatmap of the mean per-layer cosine of ``method`` (default: the run's
    method with a lambda, e.g. STEAM-ROME), minus ``baseline``'s (default: the method it
    extends, ROME) so colour shows what the alignment term adds."""
    from ..edit.editors import spec

    method = method or _pair(df)[0]
    baseline = baseline or spec(method).base
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
    (``"default"`` resolved from the edited block and the model's depth, which the per-layer
    columns give); None otherwise."""
    from types import SimpleNamespace

    from ..edit.editors import methods, spec
    from ..edit.steam import default_layers

    aligned_methods = [m for m in methods() if "lam" in spec(m).axes]
    st = df[df.method.astype(str).str.lower().isin(aligned_methods)]
    if st.empty or "align_layers" not in st or "block" not in st:
        return None
    keys = {(str(a), str(v)) for a, v in zip(st.align_layers, st.block)}
    if len(keys) != 1:
        return None
    al, block = st.align_layers.iloc[0], st.block.iloc[0]
    if isinstance(al, str) and al != "default":
        al = json.loads(al)
    if isinstance(al, list):
        return [int(i) for i in al]
    M = _layers_matrix(st.head(1), "cos_centered_layers") if "cos_centered_layers" in st else None
    if M is None or not M.size or is_nan(block):
        return None
    return default_layers(SimpleNamespace(n_blocks=M.shape[1] - 1), int(float(block)))


def sweep_figures(df: pd.DataFrame, log=print) -> dict[str, go.Figure]:
    """Every figure of a sweep's rows that the rows allow (``steamviz figures`` and notebook
    05): name -> figure."""
    from ..run.sweep import summarize

    align = run_align_layers(df)
    made = {"layer_cosine": layer_cosine(df, align_layers=align),
            "tradeoff": tradeoff(summarize(df))}
    from ..edit.editors import aligned

    steered, base = aligned(df.method.unique()) or (None, None)
    if base and (df.method == base).any() and "cos_centered_layers" in df.columns:
        try:
            made["paired_layer_difference"] = paired_layer_difference(
                df, baseline=base, align_layers=align)
        except ValueError as e:  # e.g. ROME at several edited blocks: no single baseline
            log(f"no paired-difference figure: {e}")
    if steered and df[df.method == steered].lam.dropna().nunique() >= 1:
        made["lambda_layer_heatmap"] = lambda_layer_heatmap(df, method=steered)
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
    from ..core.io import write_bytes, write_text

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
