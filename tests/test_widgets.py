"""Widget callbacks, tested outside the notebook."""

import json

import numpy as np
import pandas as pd

from steamviz.show.widgets import SweepExplorer


def _rows():
    rows = []
    for case in range(3):
        for method, lam, shift in (("unedited", None, 0.0), ("rome", None, 0.02),
                                   ("steam-rome", 20.0, 0.05), ("steam-rome", 50.0, 0.10)):
            rows.append(dict(case_id=case, method=method, lam=lam, block=5,
                             align_layers=None if lam is None else "default",
                             cos_centered_layers=json.dumps((np.ones(31) * 0.5 + shift).tolist()),
                             efficacy=1.0, paraphrase=0.5 + shift, neighborhood=0.5,
                             portability=0.5, knn_share=shift))
    return pd.DataFrame(rows)


def test_slider_changes_the_figures():
    p = SweepExplorer(_rows())
    assert list(p.slider.options) == [20.0, 50.0]
    y20 = np.array(p.cos_fig.data[2].y)
    assert np.allclose(y20, 0.55)
    p.slider.value = 50.0  # what moving the slider does
    assert np.allclose(np.array(p.cos_fig.data[2].y), 0.60)
    para = list(p.metrics_fig.data[1].y).index("paraphrase")  # horizontal bars
    assert p.metrics_fig.data[1].x[para] == 0.6
    assert p.run_button.disabled  # no runner given


def test_run_button_adds_a_point():
    class HP:
        block = 5

    class FakeRunner:
        hp = HP()

        def run_point(self, req, point):
            return dict(method=point["method"], lam=point["lam"], block=5,
                        align_layers="default", efficacy=1.0, paraphrase=0.9,
                        neighborhood=0.5, portability=0.5, knn_share=0.3,
                        cos_centered_layers=json.dumps([0.9] * 31))

    class Req:
        case_id = "x"

    p = SweepExplorer(_rows(), runner=FakeRunner(), requests=[Req(), Req()])
    assert not p.run_button.disabled
    p.new_value.value = 100.0
    p.run_button.click()
    assert 100.0 in p.slider.options and p.slider.value == 100.0
    assert np.allclose(np.array(p.cos_fig.data[2].y), 0.9)
    assert len(p.df) == len(_rows()) + 2 and "100" in p.status.value


# --- issue 21.1: every trace follows every control ---------------------------------------
# Rows are written to and read back from a real run store (steamviz.run.sweep.Store), with a
# distinct random value in every row, so a trace left at an earlier selection, or averaging
# rows of another grid point, cannot match the summary computed here from the rows.

METRICS = ["efficacy", "paraphrase", "neighborhood", "portability", "knn_share"]
N_LAYERS = 12


def _stored_rows(tmp_path, blocks, lams, aligns=("default",), centereds=(False,),
                 skipped_at=None):
    import itertools

    from steamviz.run.sweep import Store

    rng = np.random.default_rng(0)

    def measured():
        return dict(cos_centered_layers=[round(float(x), 6) for x in rng.uniform(-1, 1, N_LAYERS)],
                    **{m: round(float(rng.uniform()), 6) for m in METRICS})

    points = [dict(method="unedited", block=None, lam=None, align_layers=None, centered=None)]
    points += [dict(method="rome", block=b, lam=None, align_layers=None, centered=None)
               for b in blocks]
    points += [dict(method="steam-rome", block=b, lam=float(lam), align_layers=al, centered=c)
               for b, lam, al, c in itertools.product(blocks, lams, aligns, centereds)]
    store = Store(tmp_path / "run", writer=True)
    try:
        n = 0
        for point in points:
            row_point = {k: json.dumps(v) if isinstance(v, list) else v for k, v in point.items()}
            for case in range(3):
                store.put(f"k{n:04d}", dict(case_id=case, relation_id="P17", **measured(),
                                            **row_point))
                n += 1
            if skipped_at is not None and all(point.get(k) == v for k, v in skipped_at.items()):
                # an edit with no anchor: stored, but without any metric
                store.put(f"k{n:04d}", dict(case_id=3, relation_id="P17", skipped="no anchor",
                                            **row_point))
                n += 1
    finally:
        store.close()
    return Store(tmp_path / "run").frame()


def _expected(rows: pd.DataFrame, sel: dict) -> dict:
    """Per trace, what it must show: means over the stored rows that match ``sel`` (grid
    column -> value), computed with a groupby, independently of the panel's code."""

    def lookup(d, cols):
        if not cols:
            return d
        return d.groupby(cols).get_group(tuple(sel[c] for c in cols))

    def line(d):
        vecs = [v for v in d.cos_centered_layers if isinstance(v, list)]
        return np.mean(np.array(vecs, dtype=float), axis=0)

    def bars(d):
        return d[METRICS].mean().to_numpy()

    steam = lookup(rows[rows.method == "steam-rome"], sorted(sel))
    rome = lookup(rows[rows.method == "rome"], ["block"] if "block" in sel else [])
    unedited = rows[rows.method == "unedited"]
    return dict(lines={"unedited": line(unedited), "ROME": line(rome), "STEAM-ROME": line(steam)},
                bars={"ROME": bars(rome), "STEAM-ROME": bars(steam)})


def _check(panel, rows, sel):
    want = _expected(rows, sel)
    lines = {t.name: np.array(t.y, dtype=float) for t in panel.cos_fig.data}
    assert set(lines) == set(want["lines"]), lines.keys()
    for name, y in want["lines"].items():
        assert np.allclose(lines[name], y, atol=1e-9), (sel, name)
    bars = {t.name: t for t in panel.metrics_fig.data}
    assert set(bars) == set(want["bars"]), bars.keys()
    for name, y in want["bars"].items():  # horizontal bars: metric names on y, means on x
        assert bars[name].orientation == "h"
        assert list(bars[name].y) == METRICS
        assert np.allclose(np.array(bars[name].x, dtype=float), y, atol=1e-9), (sel, name)
    # no band traces in this panel: every trace is a line or a bar group checked above
    assert len(panel.cos_fig.data) == 3 and len(panel.metrics_fig.data) == 2


def test_block_slider_moves_every_trace_notebook_04(tmp_path):
    # notebook 04: the edited-block slider used to move only the STEAM traces; the ROME
    # line and bars kept the first block's values
    rows = _stored_rows(tmp_path, blocks=[3, 7], lams=[50.0])
    p = SweepExplorer(rows, axis="block")
    assert list(p.slider.options) == [3, 7]
    _check(p, rows, {"block": 3})
    for block in (7, 3, 7):
        p.slider.value = block
        _check(p, rows, {"block": block})


def test_lambda_slider_moves_every_trace_notebook_03(tmp_path):
    rows = _stored_rows(tmp_path, blocks=[5], lams=[10.0, 50.0])
    p = SweepExplorer(rows, axis="lam")
    for lam in (50.0, 10.0):
        p.slider.value = lam
        _check(p, rows, {"lam": lam})


def test_every_control_selects_the_rows_of_every_trace(tmp_path):
    # lambda x edited block x alignment-layer set x centring, one skipped edit: whichever
    # axis the slider has, every other grid column has a control, and every trace shows the
    # rows of the current value of every control
    rows = _stored_rows(tmp_path, blocks=[3, 7], lams=[10.0, 50.0],
                        aligns=("default", [8, 9]), centereds=(False, True),
                        skipped_at=dict(method="steam-rome", block=7, lam=50.0,
                                        align_layers=[8, 9], centered=True))
    for axis in ("lam", "block"):
        p = SweepExplorer(rows, axis=axis)
        assert set(p.controls) == {"lam", "block", "align_layers", "centered"}
        assert p.controls[axis] is p.slider and p.controls["align_layers"] is p.layer_set
        assert list(p.layer_set.options) == ["default", "[8, 9]"]

        def sel():
            return {c: w.value for c, w in p.controls.items()}

        _check(p, rows, sel())
        for w in p.controls.values():  # move each control through its values, twice
            for v in list(w.options)[::-1] + list(w.options):
                w.value = v
                _check(p, rows, sel())
        # each control ended at its last value: the grid point holding the skipped edit
        assert sel() == dict(lam=50.0, block=7, align_layers="[8, 9]", centered=True)
        assert "STEAM-ROME 3 (+1 skipped)" in p.counts.value


def test_run_point_is_computed_at_the_selection_of_the_other_controls(tmp_path):
    rows = _stored_rows(tmp_path, blocks=[3, 7], lams=[10.0, 50.0],
                        aligns=("default", [8, 9]), centereds=(False, True))
    seen = []

    class HP:
        block = 3

    class FakeRunner:
        hp = HP()

        def run_point(self, req, point):
            seen.append(point)
            return dict(point, align_layers=json.dumps(point["align_layers"]), efficacy=1.0,
                        paraphrase=0.9, neighborhood=0.5, portability=0.5, knn_share=0.3,
                        cos_centered_layers=[0.9] * N_LAYERS)

    class Req:
        case_id = "x"

    p = SweepExplorer(rows, runner=FakeRunner(), requests=[Req()], axis="lam")
    p.controls["block"].value = 7
    p.layer_set.value = "[8, 9]"
    p.controls["centered"].value = True
    p.new_value.value = 100.0
    p.run_button.click()
    assert seen == [dict(method="steam-rome", block=7, lam=100.0, align_layers=[8, 9],
                         centered=True)]
    assert p.slider.value == 100.0 and np.allclose(np.array(p.cos_fig.data[2].y), 0.9)
    _check(p, p.df, {c: w.value for c, w in p.controls.items()})


def test_resumed_sweep_progress_bar_counts_the_points_done(capsys):
    from steamviz.run.sweep import _progress_bar

    bar = _progress_bar(6, 0)
    bar.close()
    err = capsys.readouterr().err
    assert "resumed: 6 of 6 points done" in err and "6/6" in err and "0/0" not in err
    bar = _progress_bar(6, 4)
    start = capsys.readouterr().err
    bar.update(4)
    bar.close()
    end = capsys.readouterr().err
    assert "2 of 6" in start and "2/6" in start and "6/6" in end
    bar = _progress_bar(6, 6)
    bar.close()
    err = capsys.readouterr().err
    assert "resumed" not in err and "0/6" in err


def test_the_explorer_and_sweep_figures_read_the_method_pair_from_the_registry(monkeypatch):
    """A method registered with an alignment strength and a base is explored against that
    base, and gets the sweep's paired and heatmap figures; no view names STEAM-ROME."""
    from steamviz.edit import editors
    from steamviz.show.figures import sweep_figures

    editors.methods()  # the built-in rows first, then two more for this test only
    for name in ("plain-toy", "aligned-toy"):
        monkeypatch.delitem(editors.REGISTRY, name, raising=False)
        monkeypatch.delitem(editors.DISPLAY, name, raising=False)
    monkeypatch.setitem(editors.REGISTRY, "plain-toy", editors.Editor("plain-toy", axes=("block",)))
    monkeypatch.setitem(editors.REGISTRY, "aligned-toy", editors.Editor(
        "aligned-toy", axes=("block", "lam"), base="plain-toy"))
    rows = _rows()
    rows = rows[rows.method != "steam-rome"].copy()
    rows["method"] = rows.method.replace({"rome": "plain-toy"})
    steered = _rows()
    steered = steered[steered.method == "steam-rome"].assign(method="aligned-toy")
    df = pd.concat([rows, steered], ignore_index=True)
    p = SweepExplorer(df)
    assert (p.method, p.base) == ("aligned-toy", "plain-toy")
    assert [name for name, *_ in p._lines()] == ["unedited", "plain-toy", "aligned-toy"]
    assert np.allclose(np.array(p.cos_fig.data[2].y), 0.55)
    made = sweep_figures(df.assign(centered=False, seconds=1.0,
                                   cos_centered_control_layers=df.cos_centered_layers),
                         log=lambda s: None)
    assert {"paired_layer_difference", "lambda_layer_heatmap"} <= set(made)
    assert "plain-toy" in made["lambda_layer_heatmap"].data[0].colorbar.title.text
