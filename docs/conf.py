"""Sphinx configuration of the countercache documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``;
examples: ``sphinx-build -b doctest docs docs/_build/doctest`` (and
``pytest tests/test_docs.py``, which also runs every script in
``docs/examples/``).
"""

from __future__ import annotations

import countercache

project = "countercache"
author = "countercache contributors"
copyright = "2026, countercache contributors"
release = countercache.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
]

html_theme = "furo"
html_title = f"countercache {release}"
html_static_path = ["_static"]
exclude_patterns = ["_build", "examples/*.out"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# type hints name private or SQLAlchemy types that have no page here
autodoc_type_aliases: dict[str, str] = {}
nitpicky = False

doctest_global_setup = """
import countercache
"""
# every page's doctests start from the default configuration
doctest_global_cleanup = """
countercache.configure()
"""

# importing countercache.alembic for autodoc makes Alembic log its plugins
import logging  # noqa: E402

logging.getLogger("alembic").setLevel(logging.WARNING)
