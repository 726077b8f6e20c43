"""ipywidgets panels for notebooks. Logic lives here so it can be tested outside Jupyter.

>>> panel = SweepExplorer(df, runner=runner)     # df: sweep rows     # doctest: +SKIP
>>> panel.widget                                  # display in JupyterLab  # doctest: +SKIP
>>> panel.lam.value = 50.0                        # figures update at once # doctest: +SKIP

- :class:`SweepExplorer`: a lambda slider and an alignment-layer-set / edited-layer
  selector over precomputed sweep results; plotly ``FigureWidget`` s update in place; a "run"
  button computes a new grid point (progress bar) and adds it.
- :class:`EditPanel`: subject, relation prompt, new object -> run an edit, show completions
  before and after and the per-layer cosine to the new object's anchor.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import figures


def _layers_mean(df: pd.DataFrame, col: str) -> np.ndarray | None:
    vals = [json.loads(v) if isinstance(v, str) else v for v in df[col] if v is not None]
    vals = [v for v in vals if v is not None]
    return np.array(vals, dtype=float).mean(0) if vals else None


class SweepExplorer:
    """Explore a sweep by alignment strength and layer choice (see module docstring).

    ``axis``: ``"lam"`` (alignment strength) or ``"layer"`` (edited layer).
    """

    def __init__(self, df: pd.DataFrame, runner=None, requests=None, axis: str = "lam",
                 col: str = "cos_centered_layers"):
        import ipywidgets as W

        self.df = df.copy()
        self.runner = runner
        self.requests = requests
        self.axis = axis
        self.col = col
        steam = self.df[self.df.method == "steam-rome"]
        values = sorted({float(v) for v in steam[axis].dropna()}) or [0.0]
        if axis == "lam":
            self.slider = W.SelectionSlider(options=values, value=values[0], description="λ",
                                         continuous_update=True)
        else:
            self.slider = W.SelectionSlider(options=[int(v) for v in values], value=int(values[0]),
                                         description="edit layer", continuous_update=True)
        sets = sorted({str(v) for v in steam.get("align_layers", pd.Series(dtype=str)).dropna()})
        self.layer_set = W.Dropdown(options=sets or ["default"], description="align layers")
        self.new_value = W.FloatText(value=float(max(values) * 2 if values[0] else 10.0),
                                     description="new λ" if axis == "lam" else "new layer")
        self.run_button = W.Button(description="run point", icon="play",
                                   disabled=runner is None or requests is None)
        self.status = W.HTML()
        self.cos_fig = go.FigureWidget(self._cos_figure())
        self.metrics_fig = go.FigureWidget(self._metric_figure())
        self.slider.observe(lambda ch: self.update(), names="value")
        self.layer_set.observe(lambda ch: self.update(), names="value")
        self.run_button.on_click(lambda b: self.run_point(self.new_value.value))
        controls = W.HBox([self.slider, self.layer_set])
        runrow = W.HBox([self.new_value, self.run_button, self.status])
        self.widget = W.VBox([controls, self.cos_fig, self.metrics_fig, runrow])

    @property
    def lam(self):
        """The axis slider (named for the lambda axis; also the layer slider)."""
        return self.slider

    # --- data ---------------------------------------------------------------------
    def _selected(self) -> pd.DataFrame:
        d = self.df[self.df.method == "steam-rome"]
        d = d[np.isclose(d[self.axis].astype(float), float(self.slider.value))]
        if "align_layers" in d and self.layer_set.value in set(d.align_layers.astype(str)):
            d = d[d.align_layers.astype(str) == self.layer_set.value]
        return d

    def _baseline(self, method: str) -> pd.DataFrame:
        d = self.df[self.df.method == method]
        if self.axis == "layer" and method == "rome":
            d = d[np.isclose(d.layer.astype(float), float(self.slider.value))]
        return d

    def _cos_figure(self) -> go.Figure:
        fig = go.Figure()
        for method, name in (("unedited", "unedited"), ("rome", "ROME")):
            y = _layers_mean(self._baseline(method), self.col)
            fig.add_trace(go.Scatter(y=y, mode="lines", name=name,
                                     line=dict(color=figures._color(method))))
        y = _layers_mean(self._selected(), self.col)
        fig.add_trace(go.Scatter(y=y, mode="lines", name="STEAM-ROME",
                                 line=dict(color=figures._color("steam-rome"), width=3)))
        fig.update_xaxes(title="layer")
        fig.update_yaxes(title="centred cosine to anchor")
        return figures.style(fig)

    def _metric_figure(self) -> go.Figure:
        names = ["efficacy", "paraphrase", "neighborhood", "portability", "knn_share"]
        names = [n for n in names if n in self.df.columns]
        fig = go.Figure()
        for method, label, d in (("rome", "ROME", self._baseline("rome")),
                                 ("steam-rome", "STEAM-ROME", self._selected())):
            fig.add_trace(go.Bar(x=names, y=[float(d[n].mean()) if len(d) else None
                                             for n in names], name=label,
                                 marker_color=figures._color(method)))
        fig.update_layout(barmode="group")
        fig.update_yaxes(range=[0, 1])
        return figures.style(fig, "one_column")

    # --- interaction -----------------------------------------------------------------
    def update(self) -> None:
        y = _layers_mean(self._selected(), self.col)
        with self.cos_fig.batch_update():
            self.cos_fig.data[2].y = y
        names = list(self.metrics_fig.data[1].x)
        d = self._selected()
        with self.metrics_fig.batch_update():
            self.metrics_fig.data[1].y = [float(d[n].mean()) if len(d) else None for n in names]

    def run_point(self, value: float) -> pd.DataFrame:
        """Compute STEAM-ROME at a new lambda (or edited layer) for the requests, add the
        rows, and move the slider there."""
        from tqdm.auto import tqdm

        if self.runner is None or self.requests is None:
            raise RuntimeError("SweepExplorer was built without runner/requests")
        point = dict(method="steam-rome", layer=self.runner.hp.layer, lam=float(value),
                     align_layers="default", centered=False)
        if self.axis == "layer":
            point.update(layer=int(value), lam=float(self.df[self.df.method == "steam-rome"]
                                                     .lam.dropna().iloc[0]))
        rows = []
        for req in tqdm(self.requests, desc=f"{self.axis}={value:g}"):
            row = self.runner.run_point(req, point)
            row["case_id"] = req.case_id
            rows.append(row)
        new = pd.DataFrame(rows)
        self.df = pd.concat([self.df, new], ignore_index=True)
        opts = sorted(set(self.slider.options) | {type(self.slider.options[0])(value)})
        self.slider.options = opts
        self.slider.value = type(opts[0])(value)
        self.update()
        self.status.value = f"added {len(new)} rows at {self.axis}={value:g}"
        return new


class EditPanel:
    """Type a fact, run an edit, see completions and the cosine to the new anchor."""

    def __init__(self, lm, method: str = "rome", **edit_params):
        import ipywidgets as W

        self.lm, self.method, self.params = lm, method, edit_params
        self.prompt = W.Text(value="{} is located in the country of", description="prompt")
        self.subject = W.Text(value="Toronto", description="subject")
        self.target = W.Text(value="Japan", description="new object")
        self.methods = W.Dropdown(options=["rome", "steam-rome"], value=method,
                                  description="method")
        self.button = W.Button(description="edit", icon="pencil")
        self.out = W.Output()
        self.fig = go.FigureWidget(figures.style(go.Figure(), "one_column"))
        self.result: dict = {}
        self.button.on_click(lambda b: self.run())
        self.widget = W.VBox([W.HBox([self.prompt, self.subject]),
                              W.HBox([self.target, self.methods, self.button]),
                              self.out, self.fig])

    def run(self) -> dict:
        from .anchors import AnchorError, build_anchor
        from .editors import edit
        from .forward import greedy
        from .integration import last_streams
        from .requests import EditRequest

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
        if anchor is not None and self.methods.value == "steam-rome":
            params.setdefault("anchor", anchor)
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
                self.fig.add_scatter(y=cos(h_pre), name="before")
                self.fig.add_scatter(y=cos(h_post), name="after")
                self.fig.update_yaxes(title=f"cosine to {req.target_new!r} anchor")
            self.result["cos_after"] = cos(h_post)
        return self.result
