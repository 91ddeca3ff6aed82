"""The explorer in a real JupyterLab in a real browser: Debian's Chromium driven by
Playwright (no browser download). `make test` installs Chromium when it is missing.

Opens notebooks/06_explore.ipynb (parameters: a small run directory, no FiftyOne), runs
all cells from the Run menu, and checks that the widgets render -- no "Error displaying
widget" -- and that moving a slider changes the displayed map.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import papermill as pm
import pytest
from runs import make_tiny_run

from tinymim.runner import NOTEBOOKS_DIR

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, token: str, method: str = "GET", body: dict | None = None) -> bytes:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost whose root holds the prepared notebook."""
    port, token = _free_port(), "tinymim-test"
    jupyter = Path(sys.executable).with_name("jupyter")
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen([str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
                               # a fresh workspace and settings: nothing of the user's JupyterLab is read or changed
                               f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
                               f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
                              stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                _api(f"{base}/api/status", token)
                break
            except OSError:
                time.sleep(0.5)
        # render every cell (JupyterLab 4 detaches cells outside the viewport by default)
        _api(f"{base}/lab/api/settings/@jupyterlab/notebook-extension:tracker", token, "PUT",
             {"raw": json.dumps({"windowingMode": "none"})})
        yield base, token, tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_explorer_notebook_runs_and_its_widgets_respond_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "no chromium on PATH: `make test` installs Debian's (apt-get install chromium)"
    base, token, root = lab
    run = make_tiny_run(root / "run")
    pm.execute_notebook(str(NOTEBOOKS_DIR / "06_explore.ipynb"), str(root / "06_explore.ipynb"), prepare_only=True,
                        parameters={"run_dir": str(run.root), "num_images": 20, "fiftyone": False}, progress_bar=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/06_explore.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            page.locator(".jp-Cell").first.click()  # focus the notebook: Run All acts on the current one
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            image = page.locator("img.widget-image").first
            image.wait_for(state="attached", timeout=240_000)  # a fresh venv's first kernel reads a cold disk
            page.wait_for_function("() => document.querySelectorAll('.jp-InputArea-prompt').length > 0 && "
                                   "![...document.querySelectorAll('.jp-InputArea-prompt')]"
                                   ".some(e => e.textContent.includes('[*]'))", timeout=180_000)
            assert page.get_by_text("Error displaying widget").count() == 0
            assert page.locator("[data-mime-type='application/vnd.jupyter.stderr']", has_text="Traceback").count() == 0
            assert page.locator(".jp-OutputArea-output", has_text="Error").count() == 0
            image.scroll_into_view_if_needed()
            before = image.get_attribute("src")
            assert before and before.startswith(("blob:", "data:"))
            block = page.locator(".widget-slider", has_text="block").first.locator(".noUi-handle, .slider-handle").first
            block.click()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("(src) => document.querySelector('img.widget-image').src !== src", arg=before,
                                   timeout=30_000)
            assert page.locator(".widget-slider", has_text="block").first.inner_text().strip().endswith("3")
        except Exception as e:
            page.screenshot(path=str(root / "failure.png"), full_page=True)
            raise AssertionError(f"{e}\ncells as the page shows them (prompt, output):\n{_cells(page)}") from e
        finally:
            browser.close()


def _cells(page) -> str:
    """Each code cell's prompt and the start of its output: what a failed wait saw (a cell still
    queued, an error in a cell, or no Run All at all)."""
    rows = page.evaluate("() => [...document.querySelectorAll('.jp-CodeCell')].map(c => "
                         "[(c.querySelector('.jp-InputArea-prompt') || {}).textContent || '', "
                         "((c.querySelector('.jp-OutputArea') || {}).innerText || '').slice(0, 300)])")
    return "\n".join(f"{prompt.strip() or '[ ]'} {output.strip()!r}" for prompt, output in rows)
