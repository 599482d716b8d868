"""MkDocs hook: the rendered notebooks rank below the reference pages in search.

A notebook's page is one long search entry holding every cell and output, so a search for an option name
(``learning_rate``) would land there rather than on the configuration reference that documents it.
"""

from __future__ import annotations

NOTEBOOK_SEARCH_BOOST = 0.5


def on_page_content(html, page, **kwargs):
    if page.file.src_uri.endswith(".ipynb"):
        page.meta.setdefault("search", {}).setdefault("boost", NOTEBOOK_SEARCH_BOOST)
    return html
