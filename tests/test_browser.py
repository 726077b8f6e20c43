"""Every notebook in a real browser: JupyterLab, opened in Debian's chromium through
Playwright (``executable_path`` set to the system browser; Playwright downloads nothing).

For each notebook the test runs every cell from the JupyterLab UI and checks that no cell
has an error output and that its figures (and, in the sweep explorers, the ipywidgets panel)
render. In the sweep explorers (notebooks 03 and 04) it moves the panel's slider in the page,
as a user would, waits until the plotted data changes, and checks that every trace the page
draws equals the mean of the stored rows of the new selection, computed in the notebook's
kernel independently of the panel. Screenshots are taken after that move: the page, and each
plotly figure on its own, in ``$STEAMVIZ_SCREENSHOTS`` (default ``steamviz-screenshots`` in
the system's temporary folder: the test writes nothing into the checkout); the paths are
printed (``pytest -s``).

Notebooks write their run folders under ``$STEAMVIZ_RUNS`` (scripts/test.sh sets one for
the whole suite, so nbmake's run of the same notebooks resumes these sweeps).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from steamviz.show.figures import find_browser

pytestmark = pytest.mark.model
ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SLIDER_NOTEBOOKS = {"03_alignment_strength", "04_layer_depth"}  # SweepExplorer panels


def _shots() -> Path:
    d = Path(os.environ.get("STEAMVIZ_SCREENSHOTS")
             or Path(tempfile.gettempdir()) / "steamviz-screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks; yields (base url, token)."""
    if find_browser() is None:
        pytest.skip("no Chromium browser (apt-get install chromium): browser tests need one")
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(Path(__file__).parent.parent / "notebooks", root / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get Jupyter news?" toast over the screenshots
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(12)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(root / "config"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               STEAMVIZ_RUNS=os.environ.get("STEAMVIZ_RUNS") or str(root / "runs"))
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         f"--port={port}", "--ip=127.0.0.1", f"--ServerApp.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={root / 'settings'}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + (root / "jupyterlab.log").read_text()[-2000:])
        if proc.poll() is not None:
            pytest.fail("JupyterLab exited: " + (root / "jupyterlab.log").read_text()[-2000:])
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# JavaScript run in the page (JupyterLab exposes its app as window.jupyterapp)
_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return !!(w && w.sessionContext && w.sessionContext.session
            && w.sessionContext.session.kernel && w.content && w.content.model);
}"""
_RUN_ALL = """async () => {
  const w = window.jupyterapp.shell.currentWidget;
  await w.sessionContext.ready;
  window.__svDone = false;
  window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    () => { window.__svDone = true; }, (e) => { window.__svDone = 'failed: ' + e; });
}"""
_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = [];
  for (let i = 0; i < w.content.model.cells.length; i++) {
    const c = w.content.model.cells.get(i);
    if (c.type !== 'code') continue;
    const outs = c.outputs.toJSON();
    cells.push({count: c.executionCount,
                errors: outs.filter(o => o.output_type === 'error')
                            .map(o => o.ename + ': ' + o.evalue)});
  }
  return {done: window.__svDone, status: w.sessionContext.session.kernel.status, cells};
}"""
_PLOT_DATA = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
  .map(d => JSON.stringify((d.data || []).map(t => [t.name, t.y])))"""
# the traces each figure draws, as plain numbers (plotly may hold typed arrays)
_TRACES = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(d =>
  (d._fullData || []).map(t => {
    const arr = v => (v == null ? null : Array.from(
      v, x => (x == null ? null : typeof x === 'string' ? x : Number(x))));
    return {name: t.name, type: t.type, orientation: t.orientation || 'v',
            x: t.type === 'bar' ? arr(t.x) : null, y: arr(t.y)};
  }))"""
# run code in the notebook's kernel; returns what it prints
_KERNEL = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, store_history: false, silent: false});
  let out = '';
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') out += 'ERROR ' + msg.content.evalue;
  };
  await future.done;
  return out;
}"""
# in the kernel: what each trace of the panel must show for the current value of every
# control, from the stored rows (pandas on panel.df, not the panel's own selection code)
_EXPECTED = r"""
import json as _json, numpy as _np, pandas as _pd
def _pick(d, c, v):
    if c in ('lam', 'block'):
        return d[_pd.to_numeric(d[c], errors='coerce') == float(v)]
    if c == 'centered':
        return d[d[c].astype(str) == str(bool(v))]
    return d[d[c].astype(str).str.replace(' ', '') == str(v).replace(' ', '')]
def _expected(p):
    sel = {c: w.value for c, w in p.controls.items()}
    d = p.df
    steam = d[d.method == 'steam-rome']
    for c, v in sel.items():
        steam = _pick(steam, c, v)
    rome = d[d.method == 'rome']
    if 'block' in sel:
        rome = _pick(rome, 'block', sel['block'])
    def line(x):
        v = [_json.loads(s) if isinstance(s, str) else s for s in x[p.col]]
        v = [a for a in v if isinstance(a, list)]
        return _np.mean(_np.array(v, dtype=float), axis=0).tolist()
    names = [m for m in p.METRICS if m in d.columns]
    bars = lambda x: [float(x[m].mean()) for m in names]
    return dict(selection={c: str(v) for c, v in sel.items()}, metrics=names,
                lines={'unedited': line(d[d.method == 'unedited']), 'ROME': line(rome),
                       'STEAM-ROME': line(steam)},
                bars={'ROME': bars(rome), 'STEAM-ROME': bars(steam)})
print(_json.dumps(_expected(panel)))
"""


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_a_real_browser(lab, nb):
    from playwright.sync_api import sync_playwright

    url, token = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/notebooks/{nb.name}?token={token}&reset")
            page.wait_for_function(_READY, timeout=180_000, polling=500)
            page.evaluate(_RUN_ALL)
            deadline = time.time() + 1200
            while True:
                state = page.evaluate(_STATE)
                if state["done"] is not False and state["status"] == "idle":
                    break
                assert time.time() < deadline, f"{nb.name} still running after 20 min: {state}"
                time.sleep(2)
            assert state["done"] is True, state["done"]
            errors = [e for c in state["cells"] for e in c["errors"]]
            assert not errors, f"{nb.name}: error outputs {errors}"
            assert all(c["count"] for c in state["cells"]), f"{nb.name}: cells not run {state}"
            page.wait_for_timeout(1500)  # let the renderers finish drawing
            if nb.stem != "01_quickstart":  # 01 prints tables; the others draw figures
                page.wait_for_selector(".js-plotly-plot", timeout=60_000)
            if nb.stem in SLIDER_NOTEBOOKS:
                _check_slider(page, nb)  # the screenshots below are taken after the move
            shots = _shots()
            shot = shots / f"{nb.stem}.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
            plots = page.locator(".js-plotly-plot")
            for i in range(plots.count()):
                plots.nth(i).scroll_into_view_if_needed()
                page.wait_for_timeout(300)
                one = shots / f"{nb.stem}-figure{i + 1}.png"
                plots.nth(i).screenshot(path=str(one))
                print(f"screenshot: {one}")
        finally:
            browser.close()


def _check_slider(page, nb) -> None:
    """The ipywidgets panel renders, and moving its slider with the keyboard (as a user
    would) changes the data of the panel's figures."""
    slider = page.locator(".widget-slider .noUi-handle, .widget-slider input[type=range]").first
    slider.wait_for(timeout=60_000)
    slider.scroll_into_view_if_needed()
    before = page.evaluate(_PLOT_DATA)
    assert before, f"{nb.name}: the panel shows no figure"
    slider.focus()
    page.keyboard.press("Home")  # the notebook's last cell left it at the last value
    deadline = time.time() + 120
    while page.evaluate(_PLOT_DATA) == before:
        assert time.time() < deadline, f"{nb.name}: moving the slider changed no plotted data"
        page.wait_for_timeout(500)
    after = page.evaluate(_PLOT_DATA)
    changed = sum(a != b for a, b in zip(before, after))
    assert changed >= 1, json.dumps([before, after])[:500]
    page.wait_for_timeout(1000)  # let every figure finish redrawing
    _check_traces(page, nb)


def _check_traces(page, nb) -> None:
    """Every trace drawn in the page shows the stored rows of the current selection: no
    line or bar keeps a value of another setting."""
    import numpy as np

    out = page.evaluate(_KERNEL, _EXPECTED)
    assert not out.startswith("ERROR"), out
    want = json.loads(out.strip().splitlines()[-1])
    figs = page.evaluate(_TRACES)
    lines = {t["name"]: t for f in figs for t in f if t["type"] == "scatter"}
    bars = {t["name"]: t for f in figs for t in f if t["type"] == "bar"}
    for name, y in want["lines"].items():
        assert name in lines, (nb.name, name, list(lines))
        assert np.allclose(np.array(lines[name]["y"], dtype=float), y, atol=1e-6), (
            nb.name, want["selection"], name)
    for name, vals in want["bars"].items():
        t = bars[name]
        cats, got = (t["y"], t["x"]) if t["orientation"] == "h" else (t["x"], t["y"])
        assert list(cats) == want["metrics"], (nb.name, cats)
        assert np.allclose(np.array(got, dtype=float), vals, atol=1e-6), (
            nb.name, want["selection"], name)
    print(f"{nb.stem}: after the slider move ({want['selection']}) every trace matches the "
          "stored rows of that selection")
