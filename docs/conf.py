"""Sphinx configuration of the lensflow documentation (Markdown pages through MyST, API from the docstrings).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (no network needed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lensflow

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "lensflow"
author = "the lensflow authors"
copyright = "2026, the lensflow authors"
release = lensflow.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "config_reference",  # docs/_ext/config_reference.py: the config keys page, generated from conf/
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# API reference: one page per module, generated at build time and recursive over the package, so new modules
# appear without editing the docs.
autosummary_generate = True
autosummary_imported_members = False
# Members defined in each module only: a package's re-exports are documented once, on their module's page.
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
# Methods a subclass overrides without a docstring (Lightning hooks) show no text rather than the base class's.
autodoc_inherit_docstrings = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

nitpicky = False

html_theme = "furo"
html_title = f"lensflow {release}"
html_static_path: list[str] = []


# Docstrings write math in plain text (|z|, E|FFT κ|², ``kind`` (a | b)); in reStructuredText a pair of bars is a
# substitution reference. Escape the bars outside inline literals and literal blocks before docutils reads them.
_LITERAL = re.compile(r"(``.+?``)")


def _escape_bars(line: str) -> str:
    parts = _LITERAL.split(line)
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def _plain_bars(app, what, name, obj, options, lines: list[str]) -> None:
    block_indent = None  # indent of the paragraph that opened a literal block (a line ending in ``::``)
    for k, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and line.strip() and indent <= block_indent:
            block_indent = None
        if block_indent is None:
            lines[k] = _escape_bars(line)
            if line.rstrip().endswith("::"):
                block_indent = indent


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _plain_bars)
