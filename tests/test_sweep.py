"""Sweeps: config validation, and a sweep killed with SIGKILL resumes to the same store."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from steamviz.run.sweep import ConfigError, Store, SweepConfig, grid, run_sweep, units
from steamviz.core.memo import clear_caches

SMALL = dict(data="default", n_edits=2, methods=["rome", "steam-rome"], lams=[50.0],
             generation=False, bank_size=100,
             hparams=dict(context_template_length_params=[[5, 2]], v_num_grad_steps=3))


def test_bad_config_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'lambdas'"):
        SweepConfig.from_dict({"lambdas": [1]})
    with pytest.raises(ConfigError, match="'methods'.*each one of"):
        SweepConfig.from_dict({"methods": ["rome", "memmit"]})
    with pytest.raises(ConfigError, match="'lams': a list of numbers"):
        SweepConfig.from_dict({"lams": ["big"]})
    with pytest.raises(ConfigError, match="'hparams'"):
        SweepConfig.from_dict({"hparams": {"v_lrr": 1}})
    with pytest.raises(ConfigError, match="'pararel_patterns': \"first\", \"best\" or the path"):
        SweepConfig.from_dict({"pararel_patterns": "last"})
    SweepConfig.from_dict(SMALL)


def test_pararel_patterns_from_a_file(tmp_path):
    from steamviz.run.sweep import Runner

    f = tmp_path / "patterns.json"
    f.write_text(json.dumps({"P30": "{} is a part of the continent of"}))
    cfg = SweepConfig.from_dict(dict(SMALL, pararel_patterns=str(f)))
    runner = Runner.__new__(Runner)  # no model needed to read the file
    runner.cfg = cfg
    assert runner.pararel_templates() == {"P30": "{} is a part of the continent of"}
    runner.cfg = SweepConfig.from_dict(SMALL)
    assert runner.pararel_templates() is None  # "first": the pool's own default


def test_grid_points():
    cfg = SweepConfig.from_dict(dict(SMALL, lams=[5.0, 20.0], edit_blocks=[4, 6]))
    pts = grid(cfg, default_block=5)
    assert [p["method"] for p in pts].count("unedited") == 1
    assert sum(p["method"] == "rome" for p in pts) == 2
    assert {(p["block"], p["lam"]) for p in pts if p["method"] == "steam-rome"} == {
        (4, 5.0), (4, 20.0), (6, 5.0), (6, 20.0)}


def test_batch_axis_only_for_batch_editors_and_units_chunk_requests():
    cfg = SweepConfig.from_dict(dict(SMALL, methods=["rome", "memit", "steam-memit"],
                                     batch_sizes=[1, 3], lams=[20.0], include_unedited=False))
    pts = grid(cfg, default_block=5)
    assert [p.get("batch") for p in pts if p["method"] == "rome"] == [None]
    assert sorted(p["batch"] for p in pts if p["method"] == "memit") == [1, 3]
    assert {(p["batch"], p["lam"]) for p in pts if p["method"] == "steam-memit"} == {
        (1, 20.0), (3, 20.0)}
    us = units(list("abcdefg"), [dict(method="memit", batch=3), dict(method="rome")])
    assert [u[0] for u in us if u[1]["method"] == "memit"] == [list("abc"), list("def"), ["g"]]
    assert [u[0] for u in us if u[1]["method"] == "rome"] == [[x] for x in "abcdefg"]
    # request by request (a batch at its first request), grid order within one: a run stopped
    # early holds every point of its first requests
    assert [("".join(u[0]), u[1]["method"]) for u in us[:5]] == [
        ("abc", "memit"), ("a", "rome"), ("b", "rome"), ("c", "rome"), ("def", "memit")]
    with pytest.raises(ConfigError, match="'batch_sizes'"):
        SweepConfig.from_dict(dict(SMALL, batch_sizes=[0]))
    with pytest.raises(ConfigError, match="'method_params'"):
        SweepConfig.from_dict(dict(SMALL, method_params={"romee": {}}))


@pytest.mark.model
def test_batch_sweep_edits_each_batch_once(tmp_path, lm):
    cfg = SweepConfig.from_dict(dict(SMALL, n_edits=2, methods=["memit"], batch_sizes=[2],
                                     include_unedited=False, hparams=dict(
                                         context_template_length_params=[[5, 2]],
                                         v_num_grad_steps=15)))
    log = []
    df = run_sweep(cfg, tmp_path / "run", lm=lm, progress=False, log=log.append)
    assert len(df) == 2 and set(df.batch) == {2} and df.edit_seconds.nunique() == 1
    assert df.efficacy.mean() > 0.4
    # each row of the batch carries its own request's digest (--so-far matches on it)
    from steamviz.data.datasets import load_named
    from steamviz.run.plan import request_digest

    want = {r.case_id: request_digest(r.to_dict()) for r in load_named(cfg.data, 2)}
    assert df.request_digest.tolist() == df.case_id.map(want).tolist() and len(set(want)) == 2
    again = run_sweep(cfg, tmp_path / "run", lm=lm, progress=False, log=log.append)
    assert "resuming: 2 of 2" in log[-1] and len(again) == 2


def test_cli_refuses_bad_config_before_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_edits: 2\nlamdas: [1]\n")
    out = subprocess.run([sys.executable, "-m", "steamviz", "sweep", str(cfg), "--out",
                          str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown config key 'lamdas'" in out.stderr
    assert not (tmp_path / "run").exists()


def _run(cfg_path, out, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "steamviz", "sweep", str(cfg_path), "--out",
                             str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)


@pytest.mark.model
@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_equals_uninterrupted(tmp_path, lm):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    p = _run(cfg_path, killed)
    t0 = time.time()
    while time.time() - t0 < 600:
        pts = killed / "points"
        if pts.exists() and len(list(pts.glob("*.json"))) >= 2:
            break
        if p.poll() is not None:
            break
        time.sleep(0.2)
    assert p.poll() is None, "the sweep finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_before = len(list((killed / "points").glob("*.json")))
    assert 2 <= n_before < 6
    assert _run(cfg_path, killed).wait() == 0
    assert _run(cfg_path, clean).wait() == 0
    a = {r["key"]: r for r in Store(killed).rows()}
    b = {r["key"]: r for r in Store(clean).rows()}
    assert len(a) == len(b) == 6 and set(a) == set(b)
    assert not [x for x in (killed / "points").iterdir() if not x.name.endswith(".json")]
    for k in a:
        for col in ("efficacy", "paraphrase", "p_new", "cos_centered", "knn_share"):
            va, vb = a[k].get(col), b[k].get(col)
            assert (va is None and vb is None) or abs(va - vb) < 1e-6, (k, col, va, vb)
    assert json.loads((killed / "versions.json").read_text())["torch"]


def test_every_builtin_editor_is_registered():
    from steamviz.edit.editors import REGISTRY, methods

    assert {"rome", "steam-rome", "memit", "steam-memit", "sake", "baft", "kne"} <= set(
        methods(batch=False))
    assert {"memit", "steam-memit"} == set(methods(batch=True))
    assert set(methods()) == set(REGISTRY)  # one row per method, batch or not


def test_a_registered_method_gets_the_grid_axes_it_declares_and_no_other(monkeypatch):
    # issue 19: each editor is described once; the sweep reads its axes from the registry
    from steamviz import editors
    from steamviz.run.sweep import Runner

    editors.load_builtin()
    for name in ("REGISTRY", "DISPLAY"):
        monkeypatch.setattr(editors, name, dict(getattr(editors, name)))  # undone after
    editors.register("toy-steam", axes=("lam",))(lambda lm, r, **kw: None)
    editors.register("toy-batch", batch=True, axes=("block", "batch"))(lambda lm, rs, **kw: None)
    editors.register("toy-batch")(lambda lm, r, **kw: None)  # one request at a time, as memit
    editors.register("toy-plain")(lambda lm, r, **kw: None)
    assert editors.spec("toy-steam").axes == ("lam",) and not editors.spec("toy-steam").batch
    assert editors.spec("toy-batch").axes == ("block", "batch") and editors.spec("toy-batch").batch
    cfg = SweepConfig.from_dict(dict(SMALL, methods=["toy-steam", "toy-batch", "toy-plain"],
                                     lams=[5.0, 20.0], centered=[False, True], edit_blocks=[4, 6],
                                     batch_sizes=[1, 3], include_unedited=False))
    pts = grid(cfg, default_block=5)
    steam = [p for p in pts if p["method"] == "toy-steam"]
    assert {(p["block"], p["lam"], p["centered"]) for p in steam} == {
        (None, lam, c) for lam in (5.0, 20.0) for c in (False, True)}
    assert len(steam) == 4 and not any("batch" in p for p in steam)
    batch = [p for p in pts if p["method"] == "toy-batch"]
    assert sorted((p["block"], p["batch"]) for p in batch) == [(4, 1), (4, 3), (6, 1), (6, 3)]
    assert all(p["lam"] is p["align_layers"] is p["centered"] is None for p in batch)
    assert [p for p in pts if p["method"] == "toy-plain"] == [dict(
        method="toy-plain", block=None, lam=None, align_layers=None, centered=None)]
    runner = Runner.__new__(Runner)  # no model: neither point needs an anchor
    assert runner.skipped([], dict(method="toy-batch")) is None
    assert runner.skipped([], dict(method="unedited")) is None
    with pytest.raises(ValueError, match="unknown grid axes"):
        editors.register("toy-bad", axes=("layers",))
    with pytest.raises(ValueError, match="only a batch editor"):
        editors.register("toy-bad", axes=("batch",))


def test_block_indices_and_method_params_checked_against_the_model_before_any_write(tmp_path):
    # issue 17.5: out-of-range blocks and other editors' parameters, refused from the
    # config and the model's depth alone (no model load, no run folder)
    def refused(match, **kw):
        with pytest.raises(ConfigError, match=match):
            SweepConfig.from_dict(dict(SMALL, **kw)).validate(n_blocks=30)

    refused("'edit_blocks'.*< 30", edit_blocks=[30])
    refused("'align_layers'.*<= 30", align_layers=[[8, 40]])
    refused("'hparams'.*block=31.*0..29", hparams=dict(block=31))
    refused("'method_params'.*sake.*target_iters takes", methods=["sake"],
            method_params={"sake": {"target_iters": "many"}})
    refused("'method_params'.*unknown BAFT parameter 'rnk'", methods=["baft"],
            method_params={"baft": {"rnk": 4}})
    refused("'method_params'.*kne.*blocks=\\[2, 99\\]", methods=["kne"],
            method_params={"kne": {"blocks": [2, 99]}})
    refused("'method_params'.*memit.*blocks=\\[28, 29, 30\\]", methods=["memit"],
            method_params={"memit": {"blocks": [28, 29, 30]}})
    SweepConfig.from_dict(dict(SMALL, methods=["sake", "kne", "memit"], method_params={
        "sake": {"target_iters": 4}, "kne": {"blocks": [1, 2]},
        "memit": {"v_num_grad_steps": 2}})).validate(n_blocks=30)

    from steamviz.core.models import model_depth

    cfg = SweepConfig.from_dict(dict(SMALL, edit_blocks=[(model_depth() or 30) + 5]))
    with pytest.raises(ConfigError, match="'edit_blocks'"):
        run_sweep(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    cfg = SweepConfig.from_dict(dict(SMALL, data=str(tmp_path / "no-such.jsonl")))
    with pytest.raises(ConfigError, match="'data': edit request not found"):
        run_sweep(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    cfg = SweepConfig.from_dict(dict(SMALL, offset=500))
    with pytest.raises(ConfigError, match="'offset': 500 skips every one"):
        run_sweep(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    # two data sets merged into one file, both numbering from 0: their rows would be paired
    # as one request's (seen: MQuAKE's and zsRE's case 452 in the claims run's portability)
    rec = dict(prompt="{} is located in", subject="Toronto", target_new="Japan")
    lines = [dict(rec, case_id=452), dict(rec, subject="Oslo", case_id=7),
             dict(rec, subject="Lima", case_id=452)]
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = SweepConfig.from_dict(dict(SMALL, data=str(tmp_path / "twice.jsonl"), n_edits=3))
    with pytest.raises(ConfigError, match="'data': case ids repeat .*452.*own case_id"):
        run_sweep(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()  # nothing written, no model loaded


def test_memit_takes_its_own_hyperparameters_as_keywords(tokenizer):
    # method_params of a MEMIT sweep used to reach memit.apply as unknown keywords
    from conftest import build_tiny

    from steamviz.edit.editors import edit
    from steamviz.data.requests import EditRequest

    tiny = build_tiny("llama", tokenizer)
    req = EditRequest(prompt="{} is located in", subject="Toronto", target_new="Japan",
                      target_true="Canada")
    e = edit(tiny, req, "memit", v_num_grad_steps=2, blocks=[1, 2],
             context_template_length_params=[[5, 1]])
    try:
        assert e.info["hparams"]["blocks"] == (1, 2) and e.info["hparams"]["v_num_grad_steps"] == 2
    finally:
        e.restore()
    with pytest.raises(ValueError, match="blocks=\\[3, 9\\]: block indices must lie in 0..3"):
        edit(tiny, req, "memit", blocks=[3, 9])


@pytest.mark.model
def test_sweep_optimises_a_requests_objectives_together(tmp_path, lm, monkeypatch):
    """A sweep computes the target vectors of one request's ROME and STEAM points in one
    batched optimisation (#20), and each row equals its own one-at-a-time edit."""
    from steamviz import rome
    from steamviz.edit.editors import edit
    from steamviz.run.sweep import Runner

    calls = []
    real = rome.compute_vs

    def spy(lm_, prep, hp, aligns=(None,), *a, **k):
        calls.append(len(list(aligns)))
        return real(lm_, prep, hp, aligns, *a, **k)

    from steamviz import vstar

    for where in (rome, vstar):  # the sweep's batched call, and compute_v's
        monkeypatch.setattr(where, "compute_vs", spy)
    clear_caches("rome")
    cfg = SweepConfig.from_dict(dict(SMALL, n_edits=1, lams=[5.0, 50.0], include_unedited=False))
    df = run_sweep(cfg, tmp_path / "run", lm=lm, progress=False, log=lambda s: None)
    assert calls == [3] and len(df) == 3  # ROME, lambda 5, lambda 50: one optimisation
    r = Runner(cfg, lm=lm)
    req = r.requests()[0]
    for p in grid(cfg, r.hp.block):
        row = df[(df.method == p["method"]) & (df.lam.fillna(-1) == (p["lam"] or -1))].iloc[0]
        clear_caches("rome")
        with edit(lm, req, p["method"], **r.edit_kwargs(p, [req])) as e:
            one = e.info["losses"][-1]
        assert row.steps == e.info["steps"]
        assert row.final_nll == pytest.approx(one["nll"], rel=1e-3, abs=1e-4)
    assert calls[1:] == [1, 1, 1]


@pytest.mark.model
def test_a_resumed_sweep_reads_its_saved_target_vectors(tmp_path, lm, monkeypatch):
    """The target vectors a request's grid optimises together are saved in RUN/vstar: a run
    stopped after ROME's point (the STEAM points not written yet) resumes in a new process
    without optimising them again, and its rows equal the uninterrupted run's."""
    from steamviz import rome, vstar

    calls = []
    real = rome.compute_vs

    def spy(lm_, prep, hp, aligns=(None,), *a, **k):
        calls.append(len(list(aligns)))
        return real(lm_, prep, hp, aligns, *a, **k)

    for where in (rome, vstar):
        monkeypatch.setattr(where, "compute_vs", spy)
    clear_caches("rome")
    cfg = SweepConfig.from_dict(dict(SMALL, n_edits=1, lams=[5.0, 50.0], include_unedited=False))
    run = tmp_path / "run"
    full = run_sweep(cfg, run, lm=lm, progress=False, log=lambda s: None)
    assert calls == [3] and len(list((run / "vstar").glob("*.safetensors"))) == 3
    steam = full[full.method == "steam-rome"]
    for key in steam.key:  # stopped after ROME's point
        (run / "points" / f"{key}.json").unlink()
    clear_caches("rome")  # a new process
    again = run_sweep(cfg, run, lm=lm, progress=False, log=lambda s: None)
    assert calls == [3]  # read back, not optimised again
    cols = ["key", "steps", "final_nll", "efficacy", "cos_centered", "knn_share"]
    pd.testing.assert_frame_equal(again.sort_values("key")[cols].reset_index(drop=True),
                                  full.sort_values("key")[cols].reset_index(drop=True))
    # a file holding another key's vector is not read: that objective is optimised again
    f = sorted((run / "vstar").glob("*.safetensors"))
    f[0].write_bytes(f[1].read_bytes())
    for key in steam.key:
        (run / "points" / f"{key}.json").unlink()
    clear_caches("rome")
    run_sweep(cfg, run, lm=lm, progress=False, log=lambda s: None)
    assert calls == [3, 1]


@pytest.mark.model
def test_a_toy_editor_in_one_module_runs_in_a_sweep_and_shows_in_its_figures(lm, tmp_path,
                                                                            monkeypatch):
    """Issue #19: a new editor is one module (tests/toy_editor.py) with one registry entry;
    the sweep gives it the axes it declares and the figures draw it with its label/colour."""
    import importlib

    from steamviz import editors, figures

    editors.load_builtin()
    monkeypatch.setattr(editors, "REGISTRY", dict(editors.REGISTRY))  # undone after
    monkeypatch.setattr(editors, "DISPLAY", dict(editors.DISPLAY))
    import toy_editor

    importlib.reload(toy_editor)  # registers into this test's copy of the registry
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()
              if n.startswith(lm.adapter.blocks)}
    cfg = SweepConfig.from_dict(dict(SMALL, methods=["rome", toy_editor.NAME], edit_blocks=[4]))
    df = run_sweep(cfg, tmp_path / "run", lm=lm, progress=False, log=lambda s: None)
    toy = df[df.method == toy_editor.NAME]
    assert len(toy) == 2 and set(toy.block) == {4}  # its declared axis, from the grid
    assert toy.cos_centered_layers.notna().all() and toy.efficacy.notna().all()
    unedited = df[df.method == "unedited"].set_index("case_id").cos_centered
    assert (toy.set_index("case_id").cos_centered != unedited).all()  # it did edit
    for n, p in lm.model.named_parameters():  # every edit undone after its point
        if n in before:
            assert torch.equal(p, before[n]), n
    figs = figures.sweep_figures(df, log=lambda s: None)
    for name in ("layer_cosine", "tradeoff"):
        drawn = [t for t in figs[name].data if str(t.name).startswith(toy_editor.LABEL)]
        assert drawn, f"{name} does not draw the toy editor"
        colours = {getattr(getattr(t, "line", None), "color", None) for t in drawn} | {
            getattr(getattr(t, "marker", None), "color", None) for t in drawn}
        assert toy_editor.COLOR in colours, (name, colours)
