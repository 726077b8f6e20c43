"""How steamviz figures look: the shared style (:data:`STYLE`, :func:`style`) and each
method's label and colour, read from the editor registry (:data:`steamviz.edit.editors.DISPLAY`,
the colour-blind-safe Okabe-Ito palette); lambda values of a STEAM method are shades of its
colour.

>>> label("steam-rome", lam=20), color("rome")
('STEAM λ=20', '#D55E00')
>>> fig = style(go.Figure(), "one_column")        # a fixed paper size    # doctest: +SKIP
"""

from __future__ import annotations


import numpy as np
import plotly.graph_objects as go

from ..edit.editors import is_nan, label, method_key, ordered_points  # noqa: F401 (re-exported)

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

def _mix(hex_color: str, t: float) -> str:
    """``hex_color`` mixed toward white (t < 0) or black (t > 0) by |t|."""
    rgb = np.array([int(hex_color.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)
    rgb = rgb + (255 - rgb) * -t if t < 0 else rgb * (1 - t)
    return "#" + "".join(f"{int(round(v)):02X}" for v in np.clip(rgb, 0, 255))


def color(method: str, shade: int = 0, of: int = 1) -> str:
    """A method's colour from its registry row; ``shade`` of ``of`` variants (e.g. the
    lambdas of a STEAM method, lowest first) runs from a lighter to a darker version."""
    from ..edit.editors import display

    base = display(method).color
    if of <= 1:
        return base
    t = np.linspace(-0.4, 0.4, of)[min(shade, of - 1)]
    return _mix(base, float(t))


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha:g})"


def group_colors(points) -> dict:
    """``(method, lam, centered)`` -> colour: one per method, its lambdas as shades (lowest
    lambda lightest). Keys are canonical (:func:`method_key`)."""
    by: dict = {}
    for p in points:
        k = method_key(*p)
        by.setdefault(k[0], set()).add(k)
    out = {}
    for m, ks in by.items():
        ks = sorted(ks, key=lambda k: (k[1] if k[1] is not None else -1.0, k[2]))
        for i, k in enumerate(ks):
            out[k] = color(m, i, len(ks))
    return out
