"""The environment files cannot drift, and importing steamviz stays cheap."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _specs() -> dict[str, str]:
    """pyproject's requirements (with every extra), by normalised name."""
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = proj["dependencies"] + [r for extra in proj["optional-dependencies"].values()
                                   for r in extra]
    return {_name(r): r for r in reqs}


def _lock(text: str | None = None) -> dict[str, str]:
    """``{name: version}`` pinned by the lock file."""
    pins = {}
    for line in (LOCK.read_text() if text is None else text).splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements-lock.txt: {line!r} is not pinned with =="
            pins[_name(name)] = version.split(";")[0].strip()
    return pins


def _missing_or_unsatisfied(lock: dict[str, str]) -> list[str]:
    from packaging.requirements import Requirement

    bad = []
    for name, spec in _specs().items():
        if name == "torch":  # installed beside the lock, pinned in scripts/_env.sh
            continue
        if name not in lock:
            bad.append(f"{name} is not in the lock")
        elif not Requirement(spec).specifier.contains(lock[name], prereleases=True):
            bad.append(f"{name}=={lock[name]} does not satisfy {spec!r}")
    return bad


def test_every_pyproject_dependency_is_pinned_in_the_lock():
    bad = _missing_or_unsatisfied(_lock())
    assert not bad, f"run `bash scripts/lock.sh`: {bad}"


def test_the_lock_check_itself_notices_drift():
    lock = _lock()
    del lock["umap-learn"]
    lock["plotly"] = "4.0.0"
    bad = _missing_or_unsatisfied(lock)
    assert "umap-learn is not in the lock" in bad
    assert any(b.startswith("plotly==4.0.0 does not satisfy") for b in bad)


def test_torch_is_pinned_for_the_cpu_path_and_satisfies_pyproject():
    from packaging.requirements import Requirement

    env_sh = (ROOT / "scripts" / "_env.sh").read_text()
    pinned = re.findall(r"torch==([0-9.]+)", env_sh)
    assert pinned == ["2.13.0"], pinned
    assert Requirement(_specs()["torch"]).specifier.contains(pinned[0])
    assert "torch" not in _lock()  # GPU users bring their own torch


def test_environment_yml_installs_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert "-r requirements-lock.txt" in pip and "-e ." in pip
    conda = {_name(d.split("=")[0]) for d in env["dependencies"] if isinstance(d, str)}
    # conda brings python, pip and the CUDA build of torch; everything else is the lock's
    assert conda <= {"python", "pip", "pytorch", "pytorch-cuda"}, conda
    extra = [x for x in pip if not x.startswith("-")]
    assert not extra, f"environment.yml installs {extra} outside the lock"


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


def test_no_module_or_notebook_points_outside_the_repository():
    bad = []
    for p in list((ROOT / "steamviz").rglob("*.py")) + list((ROOT / "notebooks").glob("*.ipynb")):
        if "shared/notes" in p.read_text():
            bad.append(p.name)
    assert not bad, f"these refer to ../shared/notes (outside the repository): {bad}"


def test_nothing_in_the_package_loads_pickles():
    """Cache files must not be able to run code: no pickle loads, no torch.load without
    weights_only, no numpy pickles."""
    bad = []
    for p in (ROOT / "steamviz").rglob("*.py"):
        text = p.read_text()
        for needle in ("pickle.load", "weights_only=False", "allow_pickle=True", "torch.load(",
                       "import pickle", "cloudpickle"):
            if needle in text:
                bad.append(f"{p.name}: {needle}")
    assert not bad, bad


#: the subpackages in the order data flows: each may import only itself and those before it
LAYERS = ("core", "data", "look", "edit", "measure", "run", "show")


def _modules() -> dict[str, Path]:
    """``{dotted name below steamviz: path}`` of every module (``edit.rome``, ``cli``)."""
    pkg = ROOT / "steamviz"
    return {".".join(p.relative_to(pkg).with_suffix("").parts): p for p in pkg.rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def _imports(name: str, path: Path):
    """``(module it imports, the names it takes)`` for every steamviz import of a module,
    deferred (in-function) imports included; relative imports resolved."""
    import ast

    here = name.split(".")[:-1]
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = here[: len(here) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            elif n.module and n.module.startswith("steamviz."):
                target = n.module[len("steamviz."):]
            else:
                continue
            yield target, [a.name for a in n.names]
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("steamviz."):
                    yield a.name[len("steamviz."):], []


def _import_graph() -> dict[str, set[str]]:
    """``{module: steamviz modules it imports}`` (``from . import fetch`` counts as fetch)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target, names in _imports(name, path):
            subs = {f"{target}.{a}" if target else a for a in names}
            deps |= (subs & set(mods)) or ({target} & set(mods))
        graph[name] = deps - {name}
    return graph


def test_the_package_has_no_import_cycle():
    """Data flows one way (model -> capture -> edit -> measure -> run -> show): no module
    imports, even lazily, a module that imports it back."""
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert graph["run.executors"] <= {"run.plan", "run.runner"}, \
        "executors drives the runner, never sweep"


def test_the_subpackages_import_in_one_direction():
    """core -> data -> look -> edit -> measure -> run -> show: a module imports from its own
    subpackage and those before it, never after (the CLI, at the top, may import any)."""
    graph = _import_graph()
    assert {m.split(".")[0] for m in graph if "." in m} == set(LAYERS)
    up = [f"{m} -> {d}" for m, deps in graph.items() if "." in m for d in deps
          if "." not in d or LAYERS.index(d.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert not up, "imports against the data flow:\n" + "\n".join(sorted(up))


def test_the_direction_check_itself_notices_an_upward_import(tmp_path, monkeypatch):
    pkg = tmp_path / "steamviz"
    for sub in ("core", "show"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "core" / "models.py").write_text("def f():\n    from ..show import figures\n")
    (pkg / "show" / "figures.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _import_graph() == {"core.models": {"show.figures"}, "show.figures": set()}


def test_no_module_is_over_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: k for n, k in long.items() if k > 500}, long


def test_no_private_name_crosses_a_module():
    """A name with a leading underscore is its module's business: no other module imports it."""
    crossing = []
    for name, path in sorted(_modules().items()):
        for target, names in _imports(name, path):
            crossing += [f"{name}: from {target} import {a}" for a in names
                         if a.startswith("_") and not a.startswith("__")]
    assert not crossing, "\n".join(crossing)


def test_docstring_examples_run():
    """Every docstring example that does not need the model runs as written (doctest)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--doctest-modules", "steamviz",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
