"""The README's main job (`steamviz demo`) writes its report where it is told."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model


def test_demo_does_the_main_job(tmp_path, lm):
    # issue 15.3: edits with ROME and STEAM-ROME, a report with the four views, PNGs beside it
    from steamviz.show.figures import find_browser

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "steamviz", "demo", "--out", str(out), "--n", "1",
                        "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"open {out / 'report.html'}" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    (e,) = rep["edits"]
    assert e["unedited"]["completion"].strip().startswith(e["target_true"])
    assert e["rome"]["efficacy"] and e["steam-rome"]["efficacy"]
    assert e["rome"]["completion"].strip().startswith(e["target_new"])
    assert len(e["rome"]["cos_centered_layers"]) == lm.n_blocks + 1
    assert e["steam-rome"]["cos_centered_control"] is not None
    page = (out / "report.html").read_text()
    for part in ("1. Completions", "2. Per-layer cosine", "3. Latent map", "4. Logit lens",
                 "id=\"cosine\"", "id=\"latent_map\"", "id=\"latent_map_late\"",
                 "id=\"logit_lens\"",
                 "src='plotly.min.js'"):
        assert part in page, part
    assert "cdn.plot.ly" not in page and (out / "plotly.min.js").stat().st_size > 1_000_000
    md = (out / "report.md").read_text()
    assert "| edit | prompt | unedited | ROME | STEAM-ROME |" in md
    if find_browser():  # CI installs chromium
        for name in ("cosine", "latent_map", "latent_map_late", "logit_lens"):
            png = out / f"{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name}.png)" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing else written


def test_eval_params_parse_as_yaml_and_refuse_bad_items():
    from steamviz.cli import _params

    assert _params(["v_matmul_dtype=bfloat16", "v_num_grad_steps=10", "mom2_corpus=null"]) == {
        "v_matmul_dtype": "bfloat16", "v_num_grad_steps": 10, "mom2_corpus": None}
    from steamviz.cli import UsageError

    with pytest.raises(UsageError, match="KEY=VALUE"):
        _params(["v_num_grad_steps"])


@pytest.mark.parametrize("argv, says", [
    (["--n", "0"], "--n 0: evaluate at least one request"),
    (["--method", "nosuch"], "--method 'nosuch': unknown; choose one of"),
    (["--param", "v_num_grad_steps=abc"], "v_num_grad_steps takes a value of the type"),
    (["--param", "nosuch=1"], "unknown ROME parameter 'nosuch'"),
    (["--lam", "20"], "--lam is STEAM's alignment strength; --method rome has none"),
    (["--device", "nosuch"], "--device 'nosuch': use auto, cpu"),
    (["--device", "cuda:7"], "--device cuda:7: this torch build"),
    (["--data", "/no/such/file.json"], "not found"),
    (["--param", "v_num_grad_steps"], "expected KEY=VALUE"),
])
def test_eval_refuses_bad_input_in_one_line_before_loading_the_model(argv, says, tmp_path,
                                                                      monkeypatch):
    import subprocess
    import sys

    env = dict(__import__("os").environ, STEAMVIZ_CACHE=str(tmp_path))  # no model here
    out = subprocess.run([sys.executable, "-m", "steamviz", "eval", "--method", "rome",
                          "--data", "default", *argv], capture_output=True, text=True, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in out.stderr, lines
    assert not (tmp_path / "models").exists()  # the model was never loaded


def test_unknown_rome_parameter_is_named(lm):
    from steamviz.edit.editors import edit
    from steamviz.data.requests import EditRequest

    req = EditRequest(prompt="{} is located in the country of", subject="Toronto",
                      target_new="Japan", target_true="Canada")
    with pytest.raises(ValueError, match="v_nm_grad_steps"):
        edit(lm, req, "rome", v_nm_grad_steps=3)


def test_eval_refuses_a_block_outside_the_model_before_loading_it(tmp_path):
    # the depth comes from the model's config (here the GGUF header), not from loading it
    env = dict(__import__("os").environ, STEAMVIZ_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "steamviz", "eval", "--method", "rome",
                          "--data", "default", "--block", "30"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "block=30: block indices must lie in 0..29" in lines[0], lines
    assert not (tmp_path / "models").exists()


def test_every_help_page_prints():
    """argparse %-formats help strings: a bare '%' in one made `steamviz --help` crash."""
    from steamviz.cli import main

    for argv in ([], ["data"], ["pool"], ["demo"], ["edit"], ["eval"], ["sweep"], ["figures"],
                 ["claims"], ["doctor"], ["compare"]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--help"])
        assert e.value.code == 0, argv
