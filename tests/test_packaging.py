"""The environment files cannot drift, and importing steamviz stays cheap."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower()


def _deps():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [_name(d) for d in proj["dependencies"] + proj["optional-dependencies"]["dev"]]


def _env_names():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for d in env["dependencies"]:
        if isinstance(d, dict):
            names |= {_name(x) for x in d.get("pip", []) if not x.startswith("-")}
        else:
            names.add(_name(d.split("=")[0]))
    return names


def test_every_pyproject_dependency_is_in_environment_yml():
    names = _env_names()
    missing = [d for d in _deps() if CONDA_NAMES.get(d, d) not in names]
    assert not missing, f"add to environment.yml: {missing}"


def test_the_check_itself_notices_a_missing_dependency():
    assert "not-a-real-package" not in _env_names()
    assert "umap-learn" in _deps() and "umap-learn" in _env_names()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci


def test_import_is_cheap_and_side_effect_free(tmp_path):
    code = ("import sys, steamviz; "
            "bad = [m for m in ('umap', 'numba', 'plotly', 'transformers') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "steamviz", "tests",
                          "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
