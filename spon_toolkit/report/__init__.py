"""Executed notebook reports built from a results directory.

The notebook is assembled with nbformat from *report-section plugins* (hook
``spon_register_report_sections``: ``register(name, build, order=...)`` with ``build(results)`` returning
a list of cells). Sections with ``order >= APPENDIX_ORDER`` (protocol, environment, LaTeX) form the
appendix, after an "Appendix" heading. Its first code cells follow papermill's convention: a cell tagged
``parameters`` with the default ``results_dir`` and, right after it, a cell tagged ``injected-parameters``
holding the actual path *relative to the report's directory* (the kernel's working directory), so the
notebook shows no path of the machine that built it and ``papermill report.ipynb out.ipynb --cwd DIR`` or
``-p results_dir OTHER`` re-runs it. Cell ids are derived from section names (not random), so rebuilding
a report gives the same notebook.

The notebook is executed with nbclient, written to ``<reports_dir>/<experiment>.ipynb`` and exported to
HTML with nbconvert's ``lab`` template minus every external script (require.js, MathJax, mermaid, widget
manager: see :func:`export_html`): the page is self-contained, with code cells hidden behind one switch.
Cells only read saved results (see :mod:`spon_toolkit.report.views`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import SponError
from ..fileio import atomic_write_text
from ..results import Results, check_output_dir, load_results

KERNEL = "python3"
#: sections at or after this order form the appendix
APPENDIX_ORDER = 1000


def md(text: str) -> dict:
    import nbformat

    return nbformat.v4.new_markdown_cell(text.strip())


def code(source: str, tags: list[str] | None = None) -> dict:
    import nbformat

    cell = nbformat.v4.new_code_cell(source.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _cell_id(base: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-")[:56] or "cell"
    cid, n = base, 1
    while cid in used:
        n += 1
        cid = f"{base}-{n}"
    used.add(cid)
    return cid


def results_path(results: Results, reports_dir: str | Path | None) -> str:
    """The results directory as the report names it: relative to ``reports_dir`` (the directory the notebook
    is written to and executed in), else relative to the current directory; POSIX separators."""
    base = Path(reports_dir) if reports_dir is not None else Path.cwd()
    return Path(os.path.relpath(results.experiment_dir.resolve(), base.resolve())).as_posix()


def build_notebook(results: Results, toolkit, reports_dir: str | Path | None = None) -> Any:
    """Assemble (not execute) the report notebook for ``results`` from the registered sections.

    ``reports_dir``: where the notebook will live and run; the results path in it is relative to it.
    """
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["title"] = f"SPON report: {results.name}"
    path = results_path(results, reports_dir)
    description = " ".join(str(results.metadata.get("description") or "").split())
    named: list[tuple[str, dict]] = [
        ("title", md(f"# SPON experiment report: `{results.name}`\n\n"
                     + (f"{description}\n\n" if description else "")
                     + f"Results: `{path}` (relative to this report; run `{results.run_dir.name}`). Every number "
                     "below was computed by `spon run` and read back from that directory; the cells only "
                     "draw tables and figures. Rebuild with `spon report RESULTS_DIR`; protocol and "
                     "environment are in the appendix.")),
        ("parameters", code("results_dir = None  # <output-dir>/<experiment>, relative to this notebook",
                            tags=["parameters"])),
        ("injected-parameters", code(f"results_dir = {path!r}", tags=["injected-parameters"])),
        ("setup", code("from IPython.display import Markdown, display\n"
                       "from spon_toolkit.report import views\n\n"
                       "R = views.load(results_dir)")),
    ]
    entries = sorted(toolkit.report_sections, key=lambda e: (e.meta.get("order", 100), e.name))
    appendix = False
    for entry in entries:
        if not appendix and entry.meta.get("order", 100) >= APPENDIX_ORDER:
            appendix = True
            named.append(("appendix", md("# Appendix")))
        try:
            cells = list(entry.factory(results) or [])
        except Exception as exc:
            raise SponError(f"report section '{entry.name}' (plugin '{entry.plugin}') failed to build: "
                            f"{type(exc).__name__}: {exc}") from exc
        named += [(f"{entry.name}-{i}", cell) for i, cell in enumerate(cells)]
    used: set[str] = set()
    for name, cell in named:
        cell["id"] = _cell_id(name, used)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def remove_stale_kernel_dirs() -> None:
    """Remove ``spon-kernel-<pid>-*`` socket directories whose process no longer runs."""
    import shutil
    import tempfile

    for d in Path(tempfile.gettempdir()).glob("spon-kernel-*"):
        pid = d.name.removeprefix("spon-kernel-").split("-", 1)[0]
        if not pid.isdigit():
            shutil.rmtree(d, ignore_errors=True)  # an older layout without the owner's pid
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def execute_notebook(nb, cwd: str | Path, timeout: int = 600) -> list[str]:
    """Run every cell in a fresh kernel; returns the ids of cells that raised (their errors stay visible)."""
    import tempfile

    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # A local kernel over IPC sockets (in a private temporary directory) instead of TCP on localhost.
    # The kernel exits when its parent dies (ipykernel polls JPY_PARENT_PID); the socket directory of a
    # killed parent is removed here, by the next report built on this machine.
    remove_stale_kernel_dirs()
    with tempfile.TemporaryDirectory(prefix=f"spon-kernel-{os.getpid()}-") as sockets:
        km = KernelManager(kernel_name=KERNEL, transport="ipc", ip=str(Path(sockets) / "kernel"))
        client = NotebookClient(nb, km=km, timeout=timeout, kernel_name=KERNEL, allow_errors=True,
                                resources={"metadata": {"path": str(cwd)}})
        try:
            client.execute()
        finally:  # the client does not own a kernel manager it was given: stop the kernel here
            if km.has_kernel:
                km.shutdown_kernel(now=False)
    return [c.get("id", "?") for c in nb.cells if c.cell_type == "code"
            and any(o.get("output_type") == "error" for o in c.get("outputs", []))]


#: nbconvert template: the ``lab`` template without its external scripts, plus a code switch (pure CSS)
_TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
/* Code cells are hidden unless the "show code" switch is on (CSS :has(); a browser without it shows code). */
body:has(#spon-show-code:not(:checked)) .jp-CodeCell .jp-Cell-inputWrapper,
body:has(#spon-show-code:not(:checked)) .jp-InputPrompt,
body:has(#spon-show-code:not(:checked)) .jp-OutputPrompt { display: none; }
body:has(#spon-show-code:not(:checked)) .jp-CodeCell:not(:has(.jp-OutputArea-output)) { display: none; }
.spon-code-switch { position: fixed; top: 8px; right: 12px; z-index: 10; padding: 4px 10px;
  background: var(--jp-layout-color1, #fff); border: 1px solid var(--jp-border-color2, #ccc); border-radius: 4px;
  font: 13px var(--jp-ui-font-family, sans-serif); }
main { max-width: 1200px; margin: 0 auto; }
.jp-RenderedImage img { max-width: 100%; height: auto; }
.jp-RenderedHTMLCommon table { font-size: 12px; }
@media print { .spon-code-switch { display: none; } }
</style>
{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
<label class="spon-code-switch"><input type="checkbox" id="spon-show-code"> show code</label>
{%- endblock body_header -%}
"""


def html_exporter():
    """nbconvert's HTMLExporter with the self-contained report template (no script, font or style is
    fetched from the network: the lab CSS is inlined, images are embedded as data URIs)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", template_file="spon_report.html.j2",
                        extra_loaders=[DictLoader({"spon_report.html.j2": _TEMPLATE})])


def export_html(nb) -> str:
    body, _ = html_exporter().from_notebook_node(nb)
    return body


def write_report(results_dir: str | Path, reports_dir: str | Path, toolkit, *, execute: bool = True) -> dict:
    """Build, execute and write ``<reports_dir>/<experiment>.{ipynb,html}``; returns their paths.

    A cell that raises is kept in the notebook (with its traceback) and reported as a :class:`SponError`
    after both files are written, so the failing cell can be inspected.
    """
    import nbformat

    results = load_results(results_dir)
    out = check_output_dir(reports_dir, key="--reports-dir")
    nb = build_notebook(results, toolkit, reports_dir=out)
    errors = execute_notebook(nb, cwd=out) if execute else []
    ipynb = out / f"{results.name}.ipynb"
    html = out / f"{results.name}.html"
    atomic_write_text(ipynb, nbformat.writes(nb))
    atomic_write_text(html, export_html(nb))
    if errors:
        raise SponError(f"{ipynb}: report cells {', '.join(errors)} raised errors (see the notebook)")
    return {"ipynb": ipynb, "html": html, "cells": len(nb.cells)}
