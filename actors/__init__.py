"""Ray actors: thin wrappers that run :mod:`metalearn` code where the data lives."""

from actors.edge import EdgeNode, RoundCancelled, spawn_edge

__all__ = ["EdgeNode", "RoundCancelled", "spawn_edge"]
