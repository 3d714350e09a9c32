"""Sphinx configuration: MyST Markdown pages, the PyData theme, the CLI from its parsers."""

project = "remote-gpu-kernel"
author = "the remote-gpu-kernel developers"
copyright = "2026, the remote-gpu-kernel developers"

extensions = ["myst_parser", "sphinxarg.ext"]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]
exclude_patterns = ["_build"]

html_theme = "pydata_sphinx_theme"
html_title = "remote-gpu-kernel"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path: list[str] = []
