"""Figures hold the expected traces; export writes real PNG/PDF/SVG files; maps place
new points consistently."""

import json

import numpy as np
import pandas as pd
import pytest

from steamviz import figures
from steamviz.show.figures import ExportError, export
from steamviz.measure.geometry import fit_map


def _sweep_rows():
    rng = np.random.default_rng(0)
    rows = []
    for case in range(4):
        for method, lam, shift in (("unedited", None, 0.0), ("rome", None, 0.05),
                                   ("steam-rome", 20.0, 0.10), ("steam-rome", 50.0, 0.15)):
            layers = np.linspace(0.9, 0.5, 31) + shift + rng.normal(0, 0.01, 31)
            rows.append(dict(case_id=case, method=method, lam=lam, centered=None,
                             cos_centered_layers=json.dumps(layers.tolist()),
                             efficacy=float(method != "unedited"), portability=0.5,
                             fluency=5.0, cos_centered=float(layers[8:21].mean())))
    return pd.DataFrame(rows)


def test_layer_cosine_has_a_line_and_band_per_group():
    fig = figures.layer_cosine(_sweep_rows(), align_layers=range(8, 21))
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["unedited", "ROME", "STEAM λ=20", "STEAM λ=50"]
    bands = [t for t in fig.data if t.fill == "toself"]
    lines = {t.name: t for t in fig.data if t.name in names}
    assert len(bands) == 4 and len(lines["ROME"].y) == 31
    assert lines["STEAM λ=50"].y.mean() > lines["ROME"].y.mean()
    # bands are translucent and drawn below every line: no band hides a line
    last_band = max(i for i, t in enumerate(fig.data) if t.fill == "toself")
    first_line = min(i for i, t in enumerate(fig.data) if t.name in names)
    assert last_band < first_line
    assert all(b.fillcolor.startswith("rgba(") and float(b.fillcolor.split(",")[-1][:-1]) < 0.3
               for b in bands)
    assert all(b.fillcolor.startswith("rgba(") for b in bands)


def test_heatmap_and_tradeoff():
    df = _sweep_rows()
    hm = figures.lambda_layer_heatmap(df)
    assert hm.data[0].z.shape == (2, 31) and list(hm.data[0].y) == ["20", "50"]
    assert hm.data[0].z.mean() > 0  # STEAM above ROME in this synthetic sweep
    summ = df.groupby(["method", "lam"], dropna=False).mean(numeric_only=True).reset_index()
    tr = figures.tradeoff(summ)
    assert len([t for t in tr.data if t.name == "STEAM-ROME"]) == 4
    assert list(tr.data[0].x) == [20.0, 50.0]


def test_logit_lens_heatmap():
    rows = [dict(layer=i, target=t, token=t, prob=p, method="ROME")
            for i in range(5) for t, p in (("new", 0.1 * i), ("old", 0.5))]
    fig = figures.logit_lens(rows)
    assert fig.data[0].z.shape == (2, 5)


def test_pca_map_and_latent_figure():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (30, 16)) + 5, rng.normal(0, 1, (30, 16)) - 5].astype(np.float32)
    m = fit_map(x, method="pca", use_cache=False)
    np.testing.assert_allclose(m.transform(x), m.embedding, rtol=1e-4, atol=1e-4)

    class Bank:
        objects = ["A"] * 30 + ["B"] * 30
        facts = [type("F", (), {"prompt": f"p{i}"})() for i in range(60)]

    class Anchor:
        phi = np.stack([x[:30].mean(0)] * 3)

    fig = figures.latent_map(m, Bank, layer=1, anchors={"A": Anchor},
                             moves=[dict(label="e1", method="rome", pre=x[40], post=x[5])])
    names = [t.name for t in fig.data]
    assert {"facts: A", "facts: B", "anchor (mean of its facts)", "unedited", "ROME"} <= set(names)
    arrows = [a for a in fig.layout.annotations if a.showarrow and a.axref == "x"]
    assert len(arrows) == 1 and arrows[0].arrowcolor == figures.color("rome")
    labels = {a.text for a in fig.layout.annotations if not a.axref}
    assert "<b>A</b>" in labels and "<i>e1</i>" in labels  # the anchor and the edit, labelled
    with pytest.raises(ValueError, match="method must be"):
        fit_map(x, method="tsne")


def test_export_writes_files(tmp_path):
    fig = figures.layer_cosine(_sweep_rows())
    try:
        paths = export(fig, tmp_path / "cos")
    except ExportError as e:  # no browser: the message must say how to fix it
        assert "apt-get install chromium" in str(e)
        pytest.skip(str(e))
    sizes = {p.suffix: p.stat().st_size for p in paths}
    assert set(sizes) == {".html", ".png", ".pdf", ".svg"} and min(sizes.values()) > 1000
    assert (tmp_path / "cos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cos.pdf").read_bytes()[:4] == b"%PDF"


def test_missing_browser_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "find_browser", lambda: None)
    with pytest.raises(ExportError, match="apt-get install chromium"):
        export(figures.layer_cosine(_sweep_rows()), tmp_path / "x", formats=("html", "png"))
    assert (tmp_path / "x.html").exists()


@pytest.mark.slow
def test_umap_map_is_seeded_cached_and_places_new_points(tmp_path, monkeypatch):
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, (80, 12)) + 4, rng.normal(0, 1, (80, 12)) - 4].astype(np.float32)
    m = fit_map(x, method="umap", pca_dims=8, n_epochs=50)
    assert m.embedding.shape == (160, 2)
    again = fit_map(x, method="umap", pca_dims=8, n_epochs=50)  # from the in-memory cache
    assert again is m
    assert not (tmp_path / "maps").exists()  # no map is written to disk (no pickle)
    refit = fit_map(x, method="umap", pca_dims=8, n_epochs=50, use_cache=False)  # seeded
    np.testing.assert_allclose(refit.embedding, m.embedding, atol=1e-5)
    # fitted points placed again land among their own fitted neighbours (exact neighbour
    # search). UMAP's transform re-optimises each placed point, so it does not return the
    # fitted position exactly: with umap-learn 0.5.12 the mean error was 0.15-0.18 of the
    # spread over 3 data x 2 map seeds (0.21 once in a full-suite run), the own fitted
    # position being a median ~5th nearest fitted point. A broken placement lands at random
    # (median rank ~40 within the cluster).
    e = m.embedding
    spread = np.linalg.norm(e - e.mean(0), axis=1).mean()
    placed = m.transform(x[:20])
    assert np.linalg.norm(placed - e[:20], axis=1).mean() < 0.3 * spread
    d = np.linalg.norm(placed[:, None] - e[None], axis=2)  # [20, 160]
    own_rank = (d < d[np.arange(20), np.arange(20)][:, None]).sum(1)
    assert np.median(own_rank) <= 12, own_rank
    assert (d.argmin(1) < 80).all()  # nearest fitted point is in the same cluster
    # a point from cluster A lands nearer cluster A's embedding than B's
    p = m.transform(x[:1] + 0.01)[0]
    da = np.linalg.norm(m.embedding[:80].mean(0) - p)
    db = np.linalg.norm(m.embedding[80:].mean(0) - p)
    assert da < db


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_index_matches_brute_force(metric):
    from scipy.spatial.distance import cdist

    from steamviz.measure.geometry import ExactIndex

    rng = np.random.default_rng(2)
    data, q = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
    ind, dist = ExactIndex(data, metric).query(q, k=7, block=16)
    d = cdist(q, data, metric=metric)
    want = np.argsort(d, axis=1)[:, :7]
    np.testing.assert_array_equal(ind, want)
    np.testing.assert_allclose(dist, np.take_along_axis(d, want, 1), atol=1e-4)
    assert ind.dtype == np.int32 and dist.dtype == np.float32
    with pytest.raises(ValueError, match="'cosine' or 'euclidean'"):
        ExactIndex(data, "manhattan")


def test_paired_layer_difference_draws_band_line_and_control():
    from steamviz.show.figures import paired_layer_difference

    rng = np.random.default_rng(0)
    rows = []
    for c in range(12):
        base = rng.normal(0, 0.1, 5)
        rows.append(dict(case_id=c, method="rome", lam=None, centered=None,
                         cos_centered_layers=list(base),
                         cos_centered_control_layers=list(base)))
        rows.append(dict(case_id=c, method="steam-rome", lam=50.0, centered=False,
                         cos_centered_layers=list(base + [0, 0, 0.2, 0.3, 0.1]),
                         cos_centered_control_layers=list(base + 0.05)))
    fig = paired_layer_difference(pd.DataFrame(rows))
    names = [t.name for t in fig.data]
    # bands, then the dashed control lines, then the solid lines; one legend entry explains
    # the dashes
    assert names == ["STEAM λ=50 95% CI", "STEAM λ=50: control anchors", "STEAM λ=50 (n=12)",
                     "dashed: vs control anchors"]
    np.testing.assert_allclose(fig.data[2].y, [0, 0, 0.2, 0.3, 0.1], atol=1e-9)
    np.testing.assert_allclose(fig.data[1].y, [0.05] * 5, atol=1e-9)
    assert "held out" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="several rows per case_id"):
        paired_layer_difference(pd.DataFrame(rows + rows[:1]))


# --- issue 21: figures a paper can print ---------------------------------------------------

def _bank_and_map(n_far: int = 0, seed: int = 0):
    """Two clusters of 40 facts (objects A and B) around their anchors, ``n_far`` facts of B
    far away, and a PCA map fitted on them."""
    rng = np.random.default_rng(seed)
    d = 16
    a, b = np.zeros(d), np.zeros(d)
    a[0], b[0], b[1] = 4.0, -4.0, 1.0
    x = np.r_[a + rng.normal(0, 1, (40, d)), b + rng.normal(0, 1, (40, d))]
    far = np.zeros(d)
    far[0], far[1] = 2.0, 60.0
    x = np.r_[x, far + rng.normal(0, 0.5, (n_far, d))].astype(np.float32)
    objects = ["A"] * 40 + ["B"] * (40 + n_far)
    return fit_map(x, method="pca", use_cache=False), x, objects, {"A": a, "B": b}


def _all_figures():
    """One of every figure steamviz draws, and the panels' figures."""
    from steamviz.show.widgets import EditPanel, SweepExplorer

    df = _sweep_rows()
    summ = df.groupby(["method", "lam"], dropna=False).mean(numeric_only=True).reset_index()
    lens = [dict(layer=i, target=t, token=t, prob=0.1 * i + 0.01, method=m)
            for m in ("unedited", "rome") for i in range(5) for t in ("new", "old")]
    m, x, objects, anchors = _bank_and_map()
    edits = [dict(label="e1", new="A", old="B", pre=x[45], post={"rome": x[3],
                                                                 "steam-rome": x[4]}),
             dict(label="e2", new="B", old="A", pre=x[5], post={"rome": x[50]})]
    paired = df[df.method != "unedited"]
    figs = dict(layer_cosine=figures.layer_cosine(df, align_layers=[8, 9, 10]),
                paired=figures.paired_layer_difference(paired),
                heatmap=figures.lambda_layer_heatmap(df), tradeoff=figures.tradeoff(summ),
                lens=figures.logit_lens(lens), lens_lines=figures.logit_lens_lines(lens),
                edit_map=figures.edit_map(m, x, objects, 3, edits, anchors=anchors),
                facets=figures.edit_map(m, x, objects, 3, edits, anchors=anchors, facet=True))
    rows = df.assign(layer=5, align_layers=[None if v != v or v is None else "default"
                                            for v in df.lam], paraphrase=0.5,
                     neighborhood=0.5, knn_share=0.1)
    panel = SweepExplorer(rows)
    figs.update(panel_cosine=panel.cos_fig, panel_metrics=panel.metrics_fig)
    figs["edit_panel"] = EditPanel(lm=None).fig  # its figure before the first edit
    return figs


def test_method_colours_and_labels_come_from_the_registry(monkeypatch):
    from steamviz import editors
    from steamviz.show.widgets import SweepExplorer

    rows = editors.DISPLAY
    assert {"unedited", "rome", "steam-rome", "memit", "steam-memit", "sake", "baft",
            "kne"} <= set(rows)
    colors = [r.color.lower() for r in rows.values()]
    assert len(set(colors)) == len(colors), "one colour per method"
    labels = [r.label for r in rows.values()]
    assert len(set(labels)) == len(labels)
    # figures and panels read the row: change it and they follow
    monkeypatch.setitem(rows, "rome", editors.Display("Rome-X", "#123456"))
    fig = figures.layer_cosine(_sweep_rows())
    line = [t for t in fig.data if t.name == "Rome-X"]
    assert line and line[0].line.color == "#123456"
    df = _sweep_rows().assign(layer=5, align_layers="default")
    panel = SweepExplorer(df)
    assert [t.line.color for t in panel.cos_fig.data if t.name == "Rome-X"] == ["#123456"]
    assert [t.marker.color for t in panel.metrics_fig.data if t.name == "Rome-X"] == ["#123456"]
    # a method registered with a label and a colour gets its row
    monkeypatch.setattr(editors, "DISPLAY", dict(rows))
    monkeypatch.setattr(editors, "REGISTRY", dict(editors.REGISTRY))
    editors.register("my-editor", label="Mine", color="#654321")(lambda lm, r: None)
    assert figures.label("my-editor") == "Mine" and figures.color("my-editor") == "#654321"


def test_steam_lambdas_are_shades_of_the_steam_colour():
    fig = figures.layer_cosine(_sweep_rows())
    col = {t.name: t.line.color for t in fig.data if t.name in ("ROME", "STEAM λ=20",
                                                                "STEAM λ=50", "unedited")}
    assert len(set(col.values())) == 4
    base = figures.color("steam-rome")

    def rgb(h):
        return np.array([int(h.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)])

    for name in ("STEAM λ=20", "STEAM λ=50"):  # the same hue: blue dominates as in the base
        assert rgb(col[name]).argmax() == rgb(base).argmax()
    # the lower lambda is the lighter shade
    assert rgb(col["STEAM λ=20"]).sum() > rgb(col["STEAM λ=50"]).sum()


def test_no_figure_sets_a_fixed_width_and_every_axis_has_numbers_and_a_title():
    for name, fig in _all_figures().items():
        lay = fig.layout
        assert lay.width is None and lay.autosize is True, name
        axes = [k for k in lay.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]
        assert axes, name
        for k in axes:
            ax = lay[k]
            assert ax.showticklabels is not False, (name, k)
            has_data = any((t.xaxis if k.startswith("x") else t.yaxis) == k.replace("axis", "")
                           for t in fig.data) or name == "edit_panel"
            # facets (one row of two here): the y title is on the left panel only
            if has_data and not (name == "facets" and k == "yaxis2"):
                assert ax.title.text, (name, k)
        # the legend runs horizontally above the plot, below the modebar's strip
        if lay.showlegend:
            assert lay.legend.orientation == "h" and lay.legend.yref == "container", name
            top_px = (1 - lay.legend.y) * lay.height
            assert top_px >= figures.STYLE["modebar"] - 1e-6, name
            assert lay.margin.t >= top_px, name


def test_export_draws_a_fixed_paper_size_and_leaves_the_figure_alone(tmp_path, monkeypatch):
    import plotly.io as pio

    seen = []
    monkeypatch.setattr(figures, "find_browser", lambda: "/usr/bin/true")
    monkeypatch.setattr(pio, "to_image", lambda fig, format, scale: (
        seen.append((fig.layout.width, fig.layout.height, fig.layout.autosize)) or b"x" * 10))
    fig = figures.layer_cosine(_sweep_rows())
    figures.export(fig, tmp_path / "a", formats=("png",))
    figures.export(fig, tmp_path / "b", formats=("png",), size="one_column")
    assert seen[0][0] == figures.STYLE["two_column"][0] and seen[0][2] is False
    assert seen[1][0] == figures.STYLE["one_column"][0]
    assert fig.layout.width is None and fig.layout.autosize is True
    # styled again at one column, the legend wraps into more rows: the top margin grows
    one = figures.style(figures.layer_cosine(_sweep_rows()), "one_column")
    assert one.layout.width == 340 and one.layout.margin.t > fig.layout.margin.t - 30


def test_latent_maps_frame_the_edits_and_count_the_outliers_left_out():
    # 8 far facts of B (9% of the facts: a far cluster, not a lone point) must not set the
    # frame; both maps leave them out and say how many
    m, x, objects, anchors = _bank_and_map(n_far=8)
    edits = [dict(label="e1", new="A", old="B", pre=x[45], post={"rome": x[3]})]
    emb = m.transform(x)
    far = emb[-8:]

    class Bank:
        pass

    Bank.objects = objects

    class Anchor:
        def __init__(self, v):
            self.phi = np.stack([v] * 4)

    figs = [figures.edit_map(m, x, objects, 3, edits, anchors=anchors),
            figures.latent_map(m, Bank, 3, anchors={k: Anchor(v) for k, v in anchors.items()},
                               moves=[dict(label="e1", method="rome", pre=x[45], post=x[3])])]
    for fig in figs:
        (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
        inside = (far[:, 0] >= x0) & (far[:, 0] <= x1) & (far[:, 1] >= y0) & (far[:, 1] <= y1)
        assert not inside.any()
        near = emb[:80]
        share_in = ((near[:, 0] >= x0) & (near[:, 0] <= x1) & (near[:, 1] >= y0)
                    & (near[:, 1] <= y1)).mean()
        assert share_in > 0.9
        out = int((~((emb[:, 0] >= x0) & (emb[:, 0] <= x1) & (emb[:, 1] >= y0)
                     & (emb[:, 1] <= y1))).sum())
        notes = [a.text for a in fig.layout.annotations if "outside the frame" in (a.text or "")]
        assert notes == [f"{out} of 88 facts outside the frame"] and 8 <= out <= 16
    # frame=None: everything framed, nothing reported
    fig = figures.edit_map(m, x, objects, 3, edits, anchors=anchors, frame=None)
    assert fig.layout.xaxis.range is None or fig.layout.yaxis.range[1] >= far[:, 1].max()
    assert not [a for a in fig.layout.annotations if "outside" in (a.text or "")]


def test_facets_one_panel_per_edit_with_its_own_objects():
    m, x, objects, anchors = _bank_and_map()
    anchors = dict(anchors, C=np.full(16, 0.5))
    objects = list(objects[:60]) + ["C"] * 20
    edits = [dict(label=f"e{i}", new=n, old=o, pre=x[i], post={"rome": x[i + 1],
                                                                 "steam-rome": x[i + 2]})
             for i, (n, o) in enumerate((("A", "B"), ("B", "C"), ("C", "A")))]
    fig = figures.edit_map(m, x, objects, 3, edits, anchors=anchors, facet=True)
    axes = {t.xaxis for t in fig.data}
    assert axes == {"x", "x2", "x3"}  # one panel per edit
    titles = [a.text for a in fig.layout.annotations if a.xref == "paper"]
    assert [t.split("<br>")[0] for t in titles] == ["e0: B → A", "e1: C → B", "e2: A → C"]
    for k, (new, old) in zip(("x", "x2", "x3"), (("A", "B"), ("B", "C"), ("C", "A"))):
        facts = {t.name for t in fig.data if t.xaxis == k and t.name.startswith("facts")}
        assert facts == {f"facts: {new}", f"facts: {old}"}
        stars = [t for t in fig.data if t.xaxis == k and t.marker.symbol == "star"]
        assert len(stars) == 2 and min(s.marker.size for s in stars) >= 16  # legible stars
        arrows = [a for a in fig.layout.annotations if a.showarrow and a.axref == k]
        assert len(arrows) == 2 and min(a.arrowwidth for a in arrows) >= 2
        assert {f"<b>new: {new}</b>", f"<b>old: {old}</b>"} <= {
            a.text for a in fig.layout.annotations if a.xref == k}
    # each legend entry once
    entries = [t.name for t in fig.data if t.showlegend is not False]
    assert len(entries) == len(set(entries))
    # one edit: no facets
    one = figures.edit_map(m, x, objects, 3, edits[:1], anchors=anchors, facet=True)
    assert {t.xaxis for t in one.data} == {None} or {t.xaxis for t in one.data} == {"x"}


def test_map_labels_do_not_collide():
    # three anchors almost on one point, an edit beside them, a crowd of facts around
    rng = np.random.default_rng(0)
    pts = np.array([[0.0, 0.0], [0.1, 0.05], [0.05, -0.1], [0.3, 0.0]])
    texts = ["Canada", "Japan", "Mexico", "Toronto"]
    crowd = rng.normal(0, 1, (200, 2))
    spots = figures.place_labels(pts, texts, pts, crowd, ((-3, 3), (-3, 3)), (500, 400), 12)
    boxes = [s["box"] for s in spots]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            overlap = (min(a[2], b[2]) > max(a[0], b[0])) and (min(a[3], b[3]) > max(a[1], b[1]))
            assert not overlap, (texts[i], texts[j])
    # no label covers a marked point (in pixels: 500 / 6 per unit)
    px = (pts + 3) * np.array([500 / 6, 400 / 6])
    for s in spots:
        x0, y0, x1, y1 = s["box"]
        assert not ((px[:, 0] > x0) & (px[:, 0] < x1) & (px[:, 1] > y0) & (px[:, 1] < y1)).any()


def test_figures_command_draws_every_figure_of_the_gallery_run(tmp_path, capsys):
    # `steamviz figures` on the committed gallery run (docs/figures.md), without the model
    from pathlib import Path

    from steamviz.cli import main

    run = Path(__file__).parent.parent / "docs" / "gallery" / "run"
    assert main(["figures", str(run), "--formats", "html", "--out", str(tmp_path)]) == 0
    names = sorted(p.stem for p in tmp_path.glob("*.html"))
    assert names == ["lambda_layer_heatmap", "layer_cosine", "paired_layer_difference",
                     "tradeoff"]
    assert not (run / "figures").exists()  # --out: nothing written into the run
    # the gallery's PNGs are the figure types listed in docs/figures.md
    doc = (run.parent.parent / "figures.md").read_text()
    for png in sorted(run.parent.glob("*.png")):
        assert f"(gallery/{png.name})" in doc, png.name
    assert {p.stem for p in run.parent.glob("*.png")} == set(names) | {"latent_map",
                                                                         "logit_lens"}


def test_export_draws_again_when_kaleido_loses_its_page_race(tmp_path, monkeypatch):
    # seen on this machine, with the code before and after issue 21: kaleido 1.5 sometimes
    # runs its script before its page has it ("kaleido_scopes is not defined")
    import plotly.io as pio

    calls = []

    def flaky(fig, format, scale):
        calls.append(format)
        if len(calls) == 1:
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        return b"\x89PNG" + b"x" * 10

    monkeypatch.setattr(figures, "find_browser", lambda: "/usr/bin/true")
    monkeypatch.setattr(pio, "to_image", flaky)
    (p,) = export(figures.layer_cosine(_sweep_rows()), tmp_path / "a", formats=("png",))
    assert p.read_bytes().startswith(b"\x89PNG") and calls == ["png", "png"]

    def broken(fig, format, scale):
        calls.append(format)
        raise RuntimeError("something else")

    monkeypatch.setattr(pio, "to_image", broken)
    calls.clear()
    with pytest.raises(ExportError, match="something else"):
        export(figures.layer_cosine(_sweep_rows()), tmp_path / "b", formats=("png",))
    assert calls == ["png"]  # no retry for other failures


def test_replay_draws_the_aligned_method_and_its_base_by_the_registry():
    from types import SimpleNamespace

    from steamviz.run.plan import SweepConfig
    from steamviz.show.replay import _points

    def runner(**kw):
        return SimpleNamespace(cfg=SweepConfig.from_dict(kw), hp=SimpleNamespace(block=5))

    pts = _points(runner(methods=["rome", "steam-rome"], lams=[5.0, 20.0]))
    assert list(pts) == ["rome", "steam-rome"] and pts["steam-rome"]["lam"] == 20.0
    assert {p["block"] for p in pts.values()} == {5}
    pts = _points(runner(methods=["rome", "steam-rome"], lams=[20.0], edit_blocks=[3, 7]))
    assert {p["block"] for p in pts.values()} == {3}
    assert list(_points(runner(methods=["rome", "kne"]))) == ["rome", "kne"]  # no aligned one
