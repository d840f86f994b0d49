"""Sphinx configuration of trio-imappool's documentation site.

Built by scripts/test.sh with warnings as errors::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

The guide's pages include their text from README.md (one source); the API reference comes from
the docstrings; the notebooks in notebooks/ are copied here and executed during the build (each
starts a private Dovecot, as in the tests), so the site shows their outputs and plots.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import trio_imappool  # noqa: E402

project = "trio-imappool"
author = "The trio-imappool authors"
copyright = "2026, The trio-imappool authors"
version = release = trio_imappool.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# -- autodoc: Google-style docstrings, signatures as written ---------------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections as fields, so that an attribute that is also a documented property is
# not described twice.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_type_aliases: dict[str, str] = {}
autodoc_default_options = {"show-inheritance": False}
# No intersphinx: the build runs offline. References to Python's, Trio's and imapclient's
# names stay plain text.
nitpicky = False

# -- MyST and the notebooks ------------------------------------------------------------------
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# The README's sections are included below a page title of their own, one level deeper.
suppress_warnings = ["myst.header"]
nb_execution_mode = "force"
nb_execution_timeout = 120
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_kernel_rgx_aliases = {".*": "python3"}

html_theme = "alabaster"
html_title = f"trio-imappool {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "A Trio-native pool of IMAP connections",
    "fixed_sidebar": True,
}


def _copy_notebooks() -> None:
    """notebooks/*.ipynb -> docs/notebooks/ (Sphinx reads sources under docs/ only)."""
    target = HERE / "notebooks"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def _python3_kernel() -> None:
    """Make the notebooks' ``python3`` kernel this interpreter, ahead of any other installed
    kernelspec (as tests/integration/conftest.py does for the notebook tests)."""
    spec_root = Path(tempfile.mkdtemp(prefix="trio-imappool-docs-jupyter-"))
    spec_dir = spec_root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (trio-imappool docs)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    os.environ["JUPYTER_PATH"] = str(spec_root)
    os.environ.setdefault("IPYTHONDIR", str(spec_root / "ipython"))
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")


def _raises_without_a_type(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Give a type to "Raises:" lines that name none (``Whatever X raises.``), which Napoleon
    cannot parse; such a line is written as ``PoolError: Whatever X raises.``."""
    in_raises = False
    for index, line in enumerate(lines):
        if line.strip() == "Raises:":
            in_raises = True
        elif in_raises and not line.strip():
            in_raises = False
        elif in_raises and line.startswith("    Whatever "):
            lines[index] = "    PoolError: " + line.strip()


def setup(app: object) -> None:
    app.connect("autodoc-process-docstring", _raises_without_a_type, priority=100)  # type: ignore[attr-defined]


_copy_notebooks()
_python3_kernel()
