"""Sphinx configuration for the semiring_einsum documentation.

Build (warnings are errors):

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib.util

import semiring_einsum

project = "semiring_einsum"
author = "semiring_einsum developers"
copyright = "semiring_einsum developers, MIT License"
version = release = semiring_einsum.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: ``{directive}`` fences, $math$, definition lists, and #anchors for headings.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# API reference from the Google-style docstrings.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" sections as fields, not duplicate attribute entries

# The theme is furo when installed (the docs extra installs it), else Sphinx's own.
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"semiring_einsum {release}"
