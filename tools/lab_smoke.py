"""Open a notebook in real JupyterLab, run it, and check that its interactive panel renders and responds.

    python tools/lab_smoke.py notebooks/00_tour_and_baseline.ipynb --screenshot /tmp/lab.png

Needs Playwright (`pip install playwright`) and a Chromium on the machine (Debian: `apt-get install
chromium`); Playwright's own browser download is not used. Runs the notebook at CI sizes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(page, tries: int = 3) -> None:
    """Run > Run All Cells, until a cell has started: a click made while JupyterLab is still
    connecting the kernel or focusing the notebook can be lost (seen here, now and then: the
    notebook then sat idle, every cell unrun, until the panel's wait timed out)."""
    for _ in range(tries):
        page.click(".jp-Notebook")
        page.get_by_role("menuitem", name="Run").click()
        page.get_by_text("Run All Cells", exact=True).click()
        deadline = time.time() + 20
        while time.time() < deadline:
            prompts = page.locator(".jp-InputArea-prompt").all_inner_texts()
            if any(p.strip() not in ("", "[ ]:") for p in prompts):     # [*]: or [1]: ...
                return
            page.wait_for_timeout(500)
        print("Run All Cells started no cell; trying again")
    raise RuntimeError(f"Run All Cells started no cell in {tries} tries")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("notebook")
    p.add_argument("--screenshot", help="save a screenshot of the page here (default: none)")
    p.add_argument("--timeout", type=int, default=300)
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("no chromium on PATH (Debian: apt-get install chromium)")
        return 2
    from playwright.sync_api import sync_playwright

    import tempfile
    # work on a copy, with a fresh workspace: JupyterLab autosaves outputs into the notebooks
    # it has open, and the repository's notebooks must stay stripped
    work = Path(tempfile.mkdtemp(prefix="llmopt-lab-"))
    nb = work / Path(args.notebook).name
    shutil.copy(args.notebook, nb)
    port, token = free_port(), "llmopt-smoke"
    env = dict(os.environ, LLMOPT_CI="1", JUPYTER_CONFIG_DIR=str(work / "config"))
    lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                            f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1",
                            f"--ServerApp.root_dir={work}", f"--LabApp.workspaces_dir={work / 'ws'}"]
                           + (["--allow-root"] if os.geteuid() == 0 else []),
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            run_all(page)
            # the panel: a VBox of controls rendered by the widget manager (attached, not yet visible:
            # JupyterLab skips painting cells out of view, and the page may not have scrolled to it)
            page.wait_for_selector(".widget-vbox", state="attached", timeout=args.timeout * 1000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                   timeout=args.timeout * 1000)
            panel = page.locator(".widget-vbox").last
            panel.scroll_into_view_if_needed()
            before = panel.inner_text()
            slider = panel.locator(".widget-slider .noUi-handle")
            if slider.count():
                slider.first.focus()
                for _ in range(5):
                    page.keyboard.press("ArrowRight")
            else:   # no slider: pick another option of the first toggle buttons
                buttons = panel.locator(".widget-toggle-buttons button:not(.mod-active)")
                buttons.first.click()
            page.wait_for_timeout(500)
            deadline = time.time() + 60
            after = panel.inner_text()
            while after == before and time.time() < deadline:
                page.wait_for_timeout(500)
                after = panel.inner_text()
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=False)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count()
            tracebacks = page.locator("text=Traceback").count()
            browser.close()
        print(f"panel rendered; changed after moving the slider: {after != before}; "
              f"tracebacks on the page: {tracebacks}; stderr outputs: {errors}")
        return 0 if after != before and tracebacks == 0 else 1
    finally:
        lab.terminate()
        lab.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
