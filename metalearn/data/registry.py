"""Data sets by name: what ``data.dataset`` in a config may say.

=============  ================================================================
name           data set
=============  ================================================================
omniglot       Omniglot characters (the project's npz), Vinyals split
sinusoid       the MAML paper's sinusoid regression
image_folder   the user's own images, one folder per class
=============  ================================================================

A new data set plugs in with :func:`register_source` (see ``docs/DESIGN.md``, "Data sets");
register it in a module that every process imports before it reads a config (the driver, the
edge actors and the serving replicas all rebuild the source from ``data.dataset``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metalearn.data.builtin_sources import OmniglotSource, SinusoidSource
from metalearn.data.image_folder import ImageFolderSource
from metalearn.data.source import FewShotSource

SOURCES: dict[str, FewShotSource] = {
    s.name: s for s in (OmniglotSource(), SinusoidSource(), ImageFolderSource())
}


def register_source(source: FewShotSource) -> None:
    """Add a data set under ``source.name`` (an instance of a :class:`FewShotSource`)."""
    if not isinstance(source, FewShotSource):
        raise TypeError(f"a data set must be a FewShotSource instance, not {type(source)}")
    if source.name in SOURCES:
        raise ValueError(f"data set {source.name!r} is already registered")
    SOURCES[source.name] = source


def get_source(data: str | Mapping[str, Any]) -> FewShotSource:
    """The source a name, or a config's ``data`` section (its ``dataset``), names."""
    name = data if isinstance(data, str) else data["dataset"]
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[name]


def source_names() -> list[str]:
    return sorted(SOURCES)
