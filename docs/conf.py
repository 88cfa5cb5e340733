"""Sphinx configuration of the lora_muon_jax documentation.

Build (warnings are errors; run from the repository root)::

    sphinx-build -W --keep-going -b html docs build/docs

The guide pages (``docs/*.md``) are Markdown, read by MyST; the API reference
(``docs/api/*.rst``) is generated from the package's docstrings by autodoc; napoleon
reads their Google-style sections (``Args:``, ``Returns:``, ``Examples:``) and mathjax
renders ``.. math::``. The ``>>>`` examples are not run here: ``pytest`` runs them
(``--doctest-modules`` on the package, see ``pyproject.toml``) under the test
suite's settings (``-W error``, host devices), so each example runs once, in one place.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import inspect as _sphinx_inspect

# Document the checkout, not whatever copy is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "lora_muon_jax"
author = "lora_muon_jax developers"
copyright = "lora_muon_jax developers"
try:
    release = metadata.version("lora_muon_jax")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    release = "0.0.0"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

root_doc = "index"
# tables.md is benchmarks.plots' raw output; docs/benchmarks.md carries its tables.
exclude_patterns = ["_build", "benchmarks/tables.md"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# Headings get anchors, so the guide's ``page.md#section`` links resolve.
myst_heading_anchors = 3

# autodoc: document what each public module exports (its ``__all__``), in source
# order, with signatures that keep the defaults as written.
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Keep the library's type aliases by name instead of expanding their unions.
autodoc_type_aliases = {
    name: name
    for name in (
        "jax.typing.ArrayLike",
        "jax.typing.DTypeLike",
        "optax.ScalarOrSchedule",
        "optax.Updates",
        "optax.Params",
        "optax.OptState",
        "_pair_types.PairsLike",
        "PairsLike",
        "_whitened_polar.Solver",
    )
}

# An alias inside a union (``optax.ScalarOrSchedule | None``) evaluates since
# sphinx-doc/sphinx#14007, but Sphinx 9.0 prints it by its repr,
# ``TypeAliasForwardRef('optax.ScalarOrSchedule')``; print the alias's name instead.
if hasattr(_sphinx_inspect, "TypeAliasForwardRef"):
    _sphinx_inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name

# napoleon: Google style only; a class's ``Attributes:`` become ``:ivar:`` fields.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False


def _skip_namedtuple_fields(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Hides NamedTuple fields' generated "Alias for field number N" entries.

    The class signature lists the fields with their types, and the class's
    ``Attributes:`` section describes them: the entries would say it a third time.
    """
    doc = getattr(obj, "__doc__", None) or ""
    return True if doc.startswith("Alias for field number") else None


def setup(app: Sphinx) -> None:
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)


html_theme = "alabaster"
html_title = f"lora_muon_jax {release}"
