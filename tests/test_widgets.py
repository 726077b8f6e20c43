"""Widget callbacks, tested outside the notebook."""

import json

import numpy as np
import pandas as pd

from steamviz.widgets import SweepExplorer


def _rows():
    rows = []
    for case in range(3):
        for method, lam, shift in (("unedited", None, 0.0), ("rome", None, 0.02),
                                   ("steam-rome", 20.0, 0.05), ("steam-rome", 50.0, 0.10)):
            rows.append(dict(case_id=case, method=method, lam=lam, layer=5,
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
    para = list(p.metrics_fig.data[1].x).index("paraphrase")
    assert p.metrics_fig.data[1].y[para] == 0.6
    assert p.run_button.disabled  # no runner given


def test_run_button_adds_a_point():
    class HP:
        layer = 5

    class FakeRunner:
        hp = HP()

        def run_point(self, req, point):
            return dict(method=point["method"], lam=point["lam"], layer=5,
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
