"""Sphinx configuration for bayes_fusion."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "bayes_fusion"
author = "bayes_fusion developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",
]
# the example figures are rendered at build time by running the examples (nothing committed)
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 90)]
plot_working_directory = os.path.abspath("..")
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "undoc-members": False}
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = ["ref.python"]
