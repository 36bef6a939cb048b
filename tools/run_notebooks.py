"""Run notebooks' code cells as plain Python, where there is no Jupyter (a lent GPU machine).

    python tools/run_notebooks.py --ci notebooks/0*.ipynb notebooks/1*.ipynb
    python tools/run_notebooks.py --ci --out results/notebooks.md notebooks/08_compilation_and_cuda_graphs.ipynb
    python tools/run_notebooks.py --ci --param MODEL='"path/to/your-llama"' notebooks/06_quantization.ipynb

Each notebook runs top to bottom in its own namespace, from the notebooks folder (as JupyterLab runs
it), with matplotlib drawing off screen; its assertions are the check. nbval in CI does the same with a
Jupyter kernel on the CPU; this runner is for a machine that has torch and a GPU but no Jupyter:
it shows that each notebook's DEVICE = "auto" path works there. Cells that build an interactive panel
are skipped when ipywidgets is missing (the functions they wrap ran in the cells before them), and a
notebook whose imports are missing (Dask for notebook 12) is reported as skipped, not failed.
`--param NAME=VALUE` (a Python literal) overrides a parameter after the `parameters` cell, as papermill
does: your own checkpoint as MODEL, say.
Prints one line per notebook (passed / failed at cell N / skipped, seconds); exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path


def code_cells(path: Path) -> list[tuple[str, list[str]]]:
    """(source, tags) of each code cell."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [("".join(c["source"]), c.get("metadata", {}).get("tags") or [])
            for c in nb["cells"] if c["cell_type"] == "code"]


def parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"--param {name}: {value!r} is not a Python literal "
                                         f"(quote a string: {name}='\"...\"')") from None
    if isinstance(value, str) and Path(value).exists():     # a path from here: the notebooks run elsewhere
        value = str(Path(value).resolve())
    return name, value


def is_panel(src: str) -> bool:
    """A cell that builds an interactive widget panel (it needs ipywidgets and a browser to mean anything)."""
    return "ipywidgets" in src or "W.panel(" in src


def run_notebook(path: Path, *, widgets: bool, params: dict | None = None) -> dict:
    """Execute every code cell of `path` in one namespace, `params` set after its parameters cell;
    the first failure stops the notebook."""
    namespace = {"__name__": "__main__", "display": print}
    cwd = os.getcwd()
    t0 = time.perf_counter()
    os.chdir(path.parent)
    try:
        for i, (src, tags) in enumerate(code_cells(path)):
            if not widgets and is_panel(src):
                continue
            try:
                exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)
                if "parameters" in tags:
                    namespace.update(params or {})
            except ModuleNotFoundError as e:
                return {"notebook": path.name, "status": f"skipped (no {e.name})", "cell": i,
                        "seconds": time.perf_counter() - t0}
            except Exception:
                return {"notebook": path.name, "status": "failed", "cell": i,
                        "seconds": time.perf_counter() - t0, "error": traceback.format_exc(limit=6)}
            finally:
                import matplotlib.pyplot as plt
                plt.close("all")
    finally:
        os.chdir(cwd)
    return {"notebook": path.name, "status": "passed", "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--ci", action="store_true", help="CI sizes (sets LLMOPT_CI=1)")
    p.add_argument("--out", type=Path, help="also write the results as a markdown table here")
    p.add_argument("--param", type=parse_param, action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter (a Python literal), e.g. MODEL='\"path/to/your-llama\"'")
    args = p.parse_args(argv)
    if args.ci:
        os.environ["LLMOPT_CI"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # llmopt from this tree
    widgets = importlib.util.find_spec("ipywidgets") is not None
    rows = []
    for path in args.notebooks:
        row = run_notebook(path.resolve(), widgets=widgets, params=dict(args.param))
        rows.append(row)
        where = f" at cell {row['cell']}" if row["status"] != "passed" else ""
        print(f"{row['notebook']}: {row['status']}{where} ({row['seconds']:.1f} s)", flush=True)
        if "error" in row:
            print(row["error"], flush=True)
    if args.out:
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        lines = [f"Notebooks run as scripts on {device} (torch {torch.__version__}"
                 f"{', CI sizes' if args.ci else ''}{'' if widgets else ', panels skipped: no ipywidgets'}"
                 f"{''.join(f', {k}={v!r}' for k, v in args.param)}).\n",
                 "| notebook | result | seconds |", "|---|---|---|"]
        lines += [f"| {r['notebook']} | {r['status']}{' at cell ' + str(r['cell']) if 'cell' in r else ''} | "
                  f"{r['seconds']:.1f} |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
