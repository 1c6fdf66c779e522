"""The built-in default corpus: text that ships with Python itself, so no download is needed.

- "docs": the English reference documentation bundled in the standard library
  as ``pydoc_data.topics.topics`` (the text behind ``help("topic")``: ~80
  documents, ~465 KB of the Python Language Reference and Library Reference).
- "docs+code": the above plus the top-level ``*.py`` sources of the standard
  library directory (``Path(os.__file__).parent``), for a code flavour (~5 MB).

Both are iterated in sorted order so two runs see the same documents in the same
order. The exact text varies a little between Python versions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fastserve_ray.data.readers import Document
from fastserve_ray.errors import ConfigError

BUILTIN_FLAVOURS = ("docs", "docs+code")


def builtin_documents(flavour: str = "docs") -> Iterator[Document]:
    """Stream the built-in corpus of ``flavour`` ("docs" or "docs+code") in a fixed order."""
    if flavour not in BUILTIN_FLAVOURS:
        raise ConfigError(
            f"unknown built-in corpus flavour {flavour!r}; "
            f"choose one of {', '.join(BUILTIN_FLAVOURS)}"
        )
    return _generate(flavour)


def _generate(flavour: str) -> Iterator[Document]:
    from pydoc_data.topics import topics

    doc_id = 0
    for name in sorted(topics):
        if topics[name]:
            yield Document(doc_id, f"builtin:docs/{name}", topics[name])
            doc_id += 1
    if flavour == "docs+code":
        for path in sorted(Path(os.__file__).parent.glob("*.py")):
            # The stdlib is UTF-8 (PEP 3120); "replace" guards against an odd vendored file.
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield Document(doc_id, f"builtin:code/{path.name}", text)
                doc_id += 1


def builtin_source(flavour: str) -> str:
    """The name recorded in a data manifest for the built-in corpus of ``flavour``."""
    return f"builtin:{flavour}"
