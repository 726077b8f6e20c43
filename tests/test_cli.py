"""The README's main job (`steamviz demo`) writes its report where it is told."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model


def test_demo_writes_report(tmp_path, lm):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "steamviz", "demo", "--out", str(out),
                        "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    answers = {p["prompt"]: p["answer"] for p in rep["prompts"]}
    assert answers["The capital of France is"] == " Paris"
    assert len(rep["prompts"][0]["logit_lens"]) == 31
    assert (out / "report.md").exists() and (out / "capture.npz").stat().st_size > 1000
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
    from steamviz.editors import edit
    from steamviz.requests import EditRequest

    req = EditRequest(prompt="{} is located in the country of", subject="Toronto",
                      target_new="Japan", target_true="Canada")
    with pytest.raises(ValueError, match="v_nm_grad_steps"):
        edit(lm, req, "rome", v_nm_grad_steps=3)
