"""Sphinx configuration: Markdown pages through MyST; warnings are errors in tox -e docs."""

project = "pytest-runtimefaults"
author = "pytest-runtimefaults developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "examples/README.md"]
myst_heading_anchors = 3
html_theme = "alabaster"
