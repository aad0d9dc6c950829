"""Notebook execution: run a report notebook with papermill and export it to HTML (nbconvert).

The notebook is always passed in; :data:`REPORT_NOTEBOOK` is the validation report shipped inside the
package (package data), so an installed lensflow finds it without a checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from lensflow._util.atomic import write_text

__all__ = ["REPORT_NOTEBOOK", "check_notebook", "execute_notebook"]

#: The validation report notebook (parameters ``summary_dir`` or ``reference``/``candidate``).
REPORT_NOTEBOOK = Path(__file__).resolve().with_name("validation_report.ipynb")


def check_notebook(notebook: str | os.PathLike) -> Path:
    """``notebook`` as a path, after checking that it exists and papermill and nbconvert are installed."""
    path = Path(notebook)
    if not path.is_file():
        raise ValueError(f"notebook.path: {path} not found")
    try:
        import nbconvert  # noqa: F401
        import papermill  # noqa: F401
    except ImportError as e:
        raise ValueError(f"notebook.execute: needs papermill and nbconvert (pip install lensflow[dev]): {e}") from None
    return path


def execute_notebook(
    folder: str | os.PathLike, notebook: str | os.PathLike | None = None, timeout: int = 600
) -> dict[str, str]:
    """Run ``notebook`` (default :data:`REPORT_NOTEBOOK`) on ``folder`` (its ``summary_dir`` parameter)
    and export the result to HTML.

    Writes ``<notebook name>.ipynb`` and ``.html`` into ``folder`` and returns their names
    ``{"notebook", "notebook_html"}``; ``timeout`` is in seconds per cell.
    """
    folder = Path(folder).resolve()
    nb_path = check_notebook(REPORT_NOTEBOOK if notebook is None else notebook)
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    out_nb = folder / nb_path.name
    pm.execute_notebook(
        str(nb_path),
        str(out_nb),
        parameters={"summary_dir": str(folder)},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(folder),
        execution_timeout=int(timeout),
        log_output=False,
    )
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(out_nb, as_version=4))
    out_html = write_text(out_nb.with_suffix(".html"), body)
    return {"notebook": out_nb.name, "notebook_html": out_html.name}
