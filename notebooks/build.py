"""Execute the notebooks and write their reviewed .ipynb beside the percent-format sources.

    python notebooks/build.py                    # every notebook, full mode -> NAME.ipynb
    python notebooks/build.py heavy_tails        # one notebook
    python notebooks/build.py --mode small --out /tmp/nb   # CI mode, elsewhere
    python notebooks/build.py --check            # .ipynb code/markdown == .py source?
    python notebooks/build.py --sync-markdown NAME   # text edited, code not: no re-run

The source of each notebook is ``notebooks/NAME.py`` (jupytext percent format: ``# %%`` code
cells, ``# %% [markdown]`` text cells); it is what review reads. ``NAME.ipynb`` is the same
cells executed, with outputs (PNG plots), written by this script only: execution counts,
timings, kernel versions and random cell ids are removed so that a rebuild on the same numbers
gives the same file. The mode is passed to the kernel in ``TRADY_NOTEBOOK_MODE`` and read by
each notebook's parameters cell. The kernel is always the Python running this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODE_ENV = "TRADY_NOTEBOOK_MODE"
MODES = ("small", "full")


def sources() -> list[Path]:
    """The notebook sources: every ``notebooks/*.py`` that is a jupytext percent notebook."""
    return sorted(p for p in HERE.glob("*.py")
                  if p.name != "build.py" and p.read_text().lstrip().startswith("# %%"))


def read_source(path: Path):
    import jupytext
    return jupytext.read(path, fmt="py:percent")


def kernel_manager():
    """A kernel manager that starts ipykernel on this very interpreter (``sys.executable``),
    whatever kernel specs are installed (a user-wide ``python3`` spec may point elsewhere)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"],
                              display_name="Python 3 (ipykernel)", language="python",
                              resource_dir=str(HERE))

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


def execute(nb, mode: str, cell_timeout: int = 600, cwd: Path = HERE):
    """Run every cell of ``nb`` in ``mode``; a failing cell raises CellExecutionError."""
    from nbclient import NotebookClient

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed values are {', '.join(MODES)}")
    previous = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = mode          # the kernel inherits the environment
    try:
        client = NotebookClient(nb, km=kernel_manager(), timeout=cell_timeout,
                                allow_errors=False, record_timing=False,
                                resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        if previous is None:
            os.environ.pop(MODE_ENV, None)
        else:
            os.environ[MODE_ENV] = previous
    return nb


def normalize(nb, name: str):
    """Strip what changes from run to run without changing the content."""
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                       "name": "python3"},
        "language_info": {"name": "python"},
    }
    for index, cell in enumerate(nb.cells):
        cell.id = f"{name.replace('_', '-')}-{index:02d}"
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        if cell.cell_type == "code":
            cell.execution_count = None
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = None
    return nb


def cell_contents(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def build(path: Path, mode: str, out_dir: Path, cell_timeout: int = 600) -> Path:
    import nbformat

    nb = read_source(path)
    started = time.perf_counter()
    execute(nb, mode, cell_timeout)
    normalize(nb, path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}.ipynb"
    nbformat.write(nb, target)
    print(f"{path.name}: {mode} mode, {time.perf_counter() - started:.0f} s -> {target}")
    return target


def check(path: Path) -> list[str]:
    """Problems with the committed ``.ipynb`` of ``path`` (empty list: in sync, executed)."""
    import nbformat

    target = path.with_suffix(".ipynb")
    if not target.exists():
        return [f"{target.name} is missing: run python notebooks/build.py {path.stem}"]
    built = nbformat.read(target, as_version=4)
    problems = []
    if cell_contents(built) != cell_contents(read_source(path)):
        problems.append(f"{target.name} does not match {path.name}: rebuild it")
    code = [c for c in built.cells if c.cell_type == "code" and c.source.strip()]
    if code and not any(c.get("outputs") for c in code):
        problems.append(f"{target.name} has no outputs: it was not executed")
    for c in code:
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                problems.append(f"{target.name} holds an error output: {o.get('ename')}")
    return problems


def sync_markdown(path: Path) -> Path:
    """Copy the markdown cells of ``path`` into its executed ``.ipynb`` without re-running it.

    Allowed only when the code cells are unchanged (same cells, same sources), so that the
    outputs still belong to the code shown.
    """
    import nbformat

    target = path.with_suffix(".ipynb")
    built = nbformat.read(target, as_version=4)
    source = read_source(path)
    code = lambda nb: [(c.cell_type, c.source.strip() if c.cell_type == "code" else "")
                       for c in nb.cells]
    if code(built) != code(source):
        raise SystemExit(f"{path.name}: code cells differ from {target.name}; rebuild it "
                         f"(python notebooks/build.py {path.stem})")
    for cell, new in zip(built.cells, source.cells):
        if cell.cell_type == "markdown":
            cell.source = new.source
    nbformat.write(built, target)
    print(f"{target.name}: markdown cells updated from {path.name}")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the .ipynb files")
    parser.add_argument("--cell-timeout", type=int, default=600)
    parser.add_argument("--check", action="store_true",
                        help="only check that each .ipynb matches its source and was executed")
    parser.add_argument("--sync-markdown", action="store_true",
                        help="copy edited markdown cells into the executed .ipynb (code unchanged)")
    args = parser.parse_args(argv)
    paths = sources()
    if args.names:
        known = {p.stem: p for p in paths}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            parser.error(f"unknown notebooks {unknown}; allowed: {', '.join(known)}")
        paths = [known[n] for n in args.names]
    if args.sync_markdown:
        for path in paths:
            sync_markdown(path)
        return 0
    if args.check:
        problems = [p for path in paths for p in check(path)]
        print("\n".join(problems) or f"{len(paths)} notebooks in sync")
        return 1 if problems else 0
    for path in paths:
        build(path, args.mode, args.out, args.cell_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
