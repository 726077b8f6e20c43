"""ipywidgets panels for notebooks. Logic lives here so it can be tested outside Jupyter.

>>> panel = SweepExplorer(df, runner=runner)     # df: sweep rows     # doctest: +SKIP
>>> panel.widget                                  # display in JupyterLab  # doctest: +SKIP
>>> panel.lam.value = 50.0                        # figures update at once # doctest: +SKIP

- :class:`SweepExplorer`: a lambda slider and an alignment-layer-set / edited-block
  selector over precomputed sweep results; plotly ``FigureWidget`` s update in place; a "run"
  button computes a new grid point (progress bar) and adds it.
- :class:`EditPanel`: subject, relation prompt, new object -> run an edit, show completions
  before and after and the per-layer cosine to the new object's anchor.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import figures


def _layers_mean(df: pd.DataFrame, col: str) -> np.ndarray | None:
    """Mean over rows of a per-layer column (lists or JSON strings); rows without it (an
    edit skipped for want of an anchor) are left out. None when no row has it."""
    if col not in df.columns:
        return None
    vals = [json.loads(v) if isinstance(v, str) else v for v in df[col]]
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.array(vals, dtype=float).mean(0) if vals else None


def _canon(v) -> str | None:
    """One spelling of a grid value, so a control's value matches the stored rows: 20 and
    20.0, 5 and 5.0 (a layer column holding NaN is float), [8, 9] and "[8,9]"."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        return f"{float(v):.12g}"
    if isinstance(v, (list, tuple, np.ndarray)):
        return json.dumps([int(x) for x in v])
    v = str(v)
    if v.startswith("["):
        try:
            return json.dumps([int(x) for x in json.loads(v)])
        except (ValueError, TypeError):
            return v
    return v


#: the grid columns of a STEAM point that the panel has a control for, and their labels
_CONTROLS = {"lam": "λ", "block": "edited block", "align_layers": "align layers",
             "centered": "centred"}


def _options(col: str, values: pd.Series) -> list:
    """The distinct stored values of a grid column, typed for its control and sorted."""
    out = {}
    for v in values:
        k = _canon(v)
        if k is None:
            continue
        if col == "lam":
            out[k] = float(v)
        elif col == "block":
            out[k] = int(float(v))
        elif col == "centered":
            out[k] = k == "True"
        else:
            out[k] = k
    if col == "align_layers":
        return sorted(out.values(), key=lambda k: (k != "default", k))
    return sorted(out.values())


class SweepExplorer:
    """Explore a sweep by alignment strength and edited block (see module docstring).

    ``axis``: ``"lam"`` (alignment strength) or ``"block"`` (edited block): the slider.
    Every other grid column of the STEAM rows (edited block or lambda, alignment-layer set,
    centring) gets a dropdown (disabled when the sweep holds one value), so no trace ever
    averages rows of different grid points. Every trace is recomputed from the rows that
    match the current value of every control: STEAM-ROME at all of them, ROME at the
    selected edited block, the unedited model from all of its rows (anchor seeds and edits
    are averaged over, as in :func:`steamviz.run.sweep.summarize`).
    """

    METRICS = ("efficacy", "paraphrase", "neighborhood", "portability", "knn_share")

    def __init__(self, df: pd.DataFrame, runner=None, requests=None, axis: str = "lam",
                 col: str = "cos_centered_layers", method: str | None = None):
        import ipywidgets as W

        from ..edit.editors import aligned, spec

        if axis not in ("lam", "block"):
            raise ValueError(f"axis must be 'lam' or 'block' (the edited block; got {axis!r})")
        self.df = df.copy()
        self.runner = runner
        self.requests = requests
        self.axis = axis
        self.col = col
        # the explored method: one with an alignment strength (STEAM-ROME), and the method it
        # extends (ROME), both read from the registry
        pair = aligned(self.df.method.unique()) if method is None else (method, None)
        if pair is None:
            raise ValueError("these rows have no method with an alignment strength (lambda) "
                             "to explore; pass method=...")
        self.method = pair[0]
        self.base = spec(self.method).base
        steam = self.df[self.df.method == self.method]
        values = _options(axis, steam[axis]) if axis in steam else []
        values = values or ([0.0] if axis == "lam" else [0])
        self.slider = W.SelectionSlider(options=values, value=values[0],
                                        description=_CONTROLS[axis], continuous_update=True)
        self.controls = {axis: self.slider}
        for c in _CONTROLS:
            if c == axis or c not in steam or steam[c].isna().all():
                continue
            opts = _options(c, steam[c])
            self.controls[c] = W.Dropdown(options=opts, value=opts[0], description=_CONTROLS[c],
                                          disabled=len(opts) < 2)
        # the alignment-layer set control (a placeholder when the rows have no such column)
        self.layer_set = (self.controls["align_layers"] if "align_layers" in self.controls
                          else W.Dropdown(options=["default"], disabled=True,
                                          description=_CONTROLS["align_layers"]))
        start = float(max(values))
        if axis == "lam":
            first = start * 2 if start else 10.0
        else:  # an edited block the sweep does not have yet, inside the model
            n = getattr(getattr(runner, "lm", None), "n_blocks", None)
            free = [x for x in range(n - 1) if x not in {int(v) for v in values}] if n else []
            first = float(free[len(free) // 2]) if free else start + 1
        self.new_value = W.FloatText(value=first,
                                     description="new λ" if axis == "lam" else "new block")
        self.run_button = W.Button(description="run point", icon="play",
                                   disabled=runner is None or requests is None)
        self.status = W.HTML()
        self.counts = W.HTML()
        self.cos_fig = go.FigureWidget(self._cos_figure())
        self.metrics_fig = go.FigureWidget(self._metric_figure())
        self._show_counts()
        for w in self.controls.values():
            w.observe(lambda ch: self.update(), names="value")
        self.run_button.on_click(lambda b: self.run_point(self.new_value.value))
        shown = list(self.controls.values())
        if "align_layers" not in self.controls:
            shown.append(self.layer_set)
        controls = W.HBox(shown)
        runrow = W.HBox([self.new_value, self.run_button, self.status])
        self.widget = W.VBox([controls, self.counts, self.cos_fig, self.metrics_fig, runrow])

    @property
    def lam(self):
        """The axis slider (named for the lambda axis; also the edited-block slider)."""
        return self.slider

    # --- data ---------------------------------------------------------------------
    def _match(self, d: pd.DataFrame, cols) -> pd.DataFrame:
        keep = np.ones(len(d), dtype=bool)
        for c in cols:
            if c in self.controls:
                want = _canon(self.controls[c].value)
                got = d[c].map(_canon) if c in d else pd.Series([None] * len(d), index=d.index)
                keep &= (got == want).to_numpy()
        return d[keep]

    def _selected(self) -> pd.DataFrame:
        """The explored method's rows (STEAM-ROME) at the current value of every control."""
        return self._match(self.df[self.df.method == self.method], self.controls)

    def _baseline(self, method: str) -> pd.DataFrame:
        """The base method's rows (ROME) at the selected edited block; the unedited model's."""
        d = self.df[self.df.method == method]
        return d if method == "unedited" else self._match(d, ["block"])

    def _lines(self) -> list[tuple[str, str, pd.DataFrame]]:
        """(trace name, method, rows) of each line of the cosine figure, in trace order."""
        base = [(self.base, self._baseline(self.base))] if self.base else []
        return [(figures.label(m), m, d) for m, d in (
            [("unedited", self._baseline("unedited"))] + base + [(self.method, self._selected())])]

    def _bars(self) -> list[tuple[str, str, pd.DataFrame]]:
        """(trace name, method, rows) of each bar group of the metrics figure."""
        base = [(self.base, self._baseline(self.base))] if self.base else []
        return [(figures.label(m), m, d) for m, d in base + [(self.method, self._selected())]]

    def _metric_names(self) -> list[str]:
        return [n for n in self.METRICS if n in self.df.columns]

    @staticmethod
    def _means(d: pd.DataFrame, names: list[str]) -> list[float | None]:
        out = []
        for n in names:
            m = d[n].mean() if n in d and len(d) else float("nan")
            out.append(None if pd.isna(m) else float(m))
        return out

    def _cos_figure(self) -> go.Figure:
        fig = go.Figure()
        lines = self._lines()
        # earlier lines a little wider: ROME's still shows where STEAM's covers it exactly
        for (name, method, d), w in zip(lines, figures.line_widths(len(lines))):
            fig.add_trace(go.Scatter(y=_layers_mean(d, self.col), mode="lines", name=name,
                                     line=dict(color=figures.color(method), width=w)))
        fig.update_xaxes(title=figures.LAYER_AXIS)
        fig.update_yaxes(title=figures.cos_title(self.col, "mean over edits"))
        return figures.style(fig, height=300)

    def _metric_figure(self) -> go.Figure:
        """Horizontal bars, a group per metric (its name on the left, never slanted)."""
        names = self._metric_names()
        fig = go.Figure()
        for name, method, d in self._bars():
            fig.add_trace(go.Bar(y=names, x=self._means(d, names), name=name, orientation="h",
                                 marker_color=figures.color(method),
                                 hovertemplate="%{y}: %{x:.3f}<extra>" + name + "</extra>"))
        fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05)
        fig.update_xaxes(range=[0, 1], title="mean over edits (share, 0 to 1)")
        fig.update_yaxes(autorange="reversed", tickvals=names,
                         ticktext=[figures.NAMES.get(n, n) for n in names])
        return figures.style(fig, height=60 + 34 * max(1, len(names)))

    def _show_counts(self) -> None:
        """How many stored rows each line averages (skipped edits: no anchor, no metrics)."""
        parts = []
        for name, _, d in self._lines():
            skipped = int(d["skipped"].notna().sum()) if "skipped" in d else 0
            parts.append(f"{name} {len(d) - skipped}" + (f" (+{skipped} skipped)" if skipped
                                                         else ""))
        self.counts.value = "rows averaged: " + ", ".join(parts)

    # --- interaction -----------------------------------------------------------------
    def update(self) -> None:
        """Recompute every trace of both figures from the rows of the current selection."""
        with self.cos_fig.batch_update():
            for trace, (_, _, d) in zip(self.cos_fig.data, self._lines(), strict=True):
                trace.y = _layers_mean(d, self.col)
        names = self._metric_names()
        with self.metrics_fig.batch_update():
            for trace, (_, _, d) in zip(self.metrics_fig.data, self._bars(), strict=True):
                trace.y = names
                trace.x = self._means(d, names)
        self._show_counts()

    def _point(self, value: float) -> dict:
        """The grid point of a new run of the explored method: the axis at ``value``, every
        other grid column at its control's current value."""
        steam = self.df[self.df.method == self.method]

        def cur(c, default):
            return self.controls[c].value if c in self.controls else default

        lams = steam.lam.dropna() if "lam" in steam else pd.Series(dtype=float)
        align = cur("align_layers", "default")
        point = dict(method=self.method, block=int(cur("block", self.runner.hp.block)),
                     lam=float(cur("lam", lams.iloc[0] if len(lams) else 20.0)),
                     align_layers=align if align == "default" else json.loads(align),
                     centered=bool(cur("centered", False)))
        point[self.axis] = float(value) if self.axis == "lam" else int(value)
        return point

    def run_point(self, value: float) -> pd.DataFrame:
        """Compute STEAM-ROME at a new lambda (or edited block) for the requests, at the
        current value of every other control; add the rows and move the slider there."""
        from tqdm.auto import tqdm

        if self.runner is None or self.requests is None:
            raise RuntimeError("SweepExplorer was built without runner/requests")
        point = self._point(value)
        rows = []
        for req in tqdm(self.requests, desc=f"{self.axis}={value:g}"):
            row = self.runner.run_point(req, point)
            row["case_id"] = req.case_id
            rows.append(row)
        new = pd.DataFrame(rows)
        self.df = pd.concat([self.df, new], ignore_index=True)
        v = point[self.axis]
        opts = sorted(set(self.slider.options) | {v})
        self.slider.options = opts
        self.slider.value = v
        self.update()
        self.status.value = f"added {len(new)} rows at {self.axis}={value:g}"
        return new


class EditPanel:
    """Type a fact, run an edit, see completions and the cosine to the new anchor."""

    def __init__(self, lm, method: str = "rome", **edit_params):
        import ipywidgets as W

        from ..edit.editors import methods

        self.lm, self.method, self.params = lm, method, edit_params
        self.prompt = W.Text(value="{} is located in the country of", description="prompt")
        self.subject = W.Text(value="Toronto", description="subject")
        self.target = W.Text(value="Japan", description="new object")
        self.methods = W.Dropdown(options=methods(batch=False), value=method,
                                  description="method")
        self.button = W.Button(description="edit", icon="pencil")
        self.out = W.Output()
        empty = go.Figure()
        empty.update_xaxes(title=figures.LAYER_AXIS)
        empty.update_yaxes(title="cosine to the new object's anchor")
        self.fig = go.FigureWidget(figures.style(empty, height=280))
        self.result: dict = {}
        self.button.on_click(lambda b: self.run())
        self.widget = W.VBox([W.HBox([self.prompt, self.subject]),
                              W.HBox([self.target, self.methods, self.button]),
                              self.out, self.fig])

    def run(self) -> dict:
        from ..look.anchors import AnchorError, build_anchor
        from ..edit.editors import edit, spec
        from ..core.forward import greedy
        from ..measure.integration import last_streams
        from ..data.requests import EditRequest

        req = EditRequest(prompt=self.prompt.value, subject=self.subject.value,
                          target_new=self.target.value)
        prompts = [req.rewrite_prompt]
        try:  # the anchor is read from the unedited model, before the edit
            anchor, why = build_anchor(self.lm, req.target_new,
                                       exclude_subjects=(req.subject,)), None
        except AnchorError as e:
            anchor, why = None, e
        before = greedy(self.lm, prompts, 12)[0]
        h_pre = last_streams(self.lm, prompts)[0]
        params = dict(self.params)
        row = spec(self.methods.value)
        if anchor is not None and "lam" in row.axes:  # STEAM's anchor, as the editor takes it
            if "anchor" in row.extra:
                params.setdefault("anchor", anchor)
            elif "anchors" in row.extra:
                params.setdefault("anchors", {req.target_new: anchor})
        with edit(self.lm, req, self.methods.value, **params):
            after = greedy(self.lm, prompts, 12)[0]
            h_post = last_streams(self.lm, prompts)[0]
        self.result = dict(before=before, after=after)
        self.out.clear_output()
        with self.out:
            print(f"before: {req.rewrite_prompt}{before}\nafter:  {req.rewrite_prompt}{after}")
            if anchor is None:
                print(f"(no anchor: {why})")
        if anchor is not None:
            a = anchor
            cos = lambda h: (  # noqa: E731
                np.asarray(np.sum(h.numpy() * a.phi.numpy(), -1)
                           / (np.linalg.norm(h.numpy(), axis=-1)
                              * np.linalg.norm(a.phi.numpy(), axis=-1))))
            with self.fig.batch_update():
                self.fig.data = []
                self.fig.add_scatter(y=cos(h_pre), name="before (unedited)",
                                     line=dict(color=figures.color("unedited"), width=2.2))
                self.fig.add_scatter(y=cos(h_post),
                                     name=f"after ({figures.label(self.methods.value)})",
                                     line=dict(color=figures.color(self.methods.value),
                                               width=2.2))
                self.fig.update_yaxes(title=f"cosine to the {req.target_new!r} anchor")
                figures.style(self.fig, height=280)  # the legend now has entries
            self.result["cos_after"] = cos(h_post)
        return self.result
