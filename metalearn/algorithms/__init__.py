"""Meta-learning algorithms behind one interface, built by name from plain config values.

=============  ===================================================================
name           algorithm
=============  ===================================================================
maml           second-order MAML (``impl``: ``func`` fast path or ``higher`` reference)
fomaml         first-order MAML
reptile        Reptile (meta-gradient = θ − mean of adapted θ)
anil           ANIL: only ``head.*`` adapts in the inner loop
metasgd        Meta-SGD: learned per-element inner learning rates ``lr.<name>``
protonet       prototypical networks over an embedding model (``ways=0``)
matching       Matching Networks: cosine attention over support embeddings (FCE optional)
siamese        Siamese networks: a twin trained on same/different pairs, weighted L1 distance
cavia          CAVIA: only the context parameters (``context``, reset to 0) adapt
hallucination  ProtoNet over a support set augmented by a learned generator (Wang et al.)
mann           MANN: LSTM controller, LRU-access memory filled by the support sequence
versa          VERSA: amortized inference of each class's weight distribution (Gordon et al.)
=============  ===================================================================
"""

from __future__ import annotations

import inspect

from torch import nn

from metalearn.algorithms.anil import ANIL
from metalearn.algorithms.base import MetaAlgorithm, MetaUpdate, TaskType
from metalearn.algorithms.cavia import CAVIA
from metalearn.algorithms.hallucination import SupportHallucination
from metalearn.algorithms.maml import FOMAML, MAML
from metalearn.algorithms.mann import MANN
from metalearn.algorithms.matching import MatchingNetworks
from metalearn.algorithms.metasgd import MetaSGD
from metalearn.algorithms.protonet import ProtoNet
from metalearn.algorithms.reptile import Reptile
from metalearn.algorithms.siamese import SiameseNetworks
from metalearn.algorithms.versa import VERSA

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "protonet": ProtoNet,
    "matching": MatchingNetworks,
    "siamese": SiameseNetworks,
    "cavia": CAVIA,
    "hallucination": SupportHallucination,
    "mann": MANN,
    "versa": VERSA,
}


def register_algorithm(name: str, cls: type[MetaAlgorithm]) -> None:
    """Add an algorithm under ``name`` (its ``__init__(model, task_type, **hyper)``)."""
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is already registered")
    ALGORITHMS[name] = cls


def hyperparameters(name: str) -> list[str]:
    """The keyword hyperparameters an algorithm accepts (besides ``model``, ``task_type``)."""
    cls = _lookup(name)
    sig = inspect.signature(cls.__init__)
    return [p for p in sig.parameters if p not in ("self", "model", "task_type")]


def embedding_only(name: str) -> bool:
    """Whether the algorithm's meta-model has no classes of its own (a metric learner: its
    classes are those of the support set it is adapted on), which serving must know."""
    return bool(_lookup(name).embedding_only)


def classifier_only(name: str) -> bool:
    """Whether the algorithm can only classify (every metric learner, and MANN)."""
    cls = _lookup(name)
    return bool(cls.embedding_only or cls.classifier_only)


def _lookup(name: str) -> type[MetaAlgorithm]:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def build_algorithm(name: str, model: nn.Module, task_type: TaskType = "classification",
                    **hyper: object) -> MetaAlgorithm:
    """An algorithm by registry name; unknown names or hyperparameters raise ``ValueError``."""
    cls = _lookup(name)
    accepted = hyperparameters(name)
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for algorithm {name!r}; "
                         f"it accepts {accepted}")
    if task_type not in ("classification", "regression"):
        raise ValueError(f"task_type must be 'classification' or 'regression', not {task_type!r}")
    return cls(model, task_type, **hyper)  # type: ignore[arg-type]


__all__ = [
    "ALGORITHMS",
    "ANIL",
    "CAVIA",
    "FOMAML",
    "MAML",
    "MANN",
    "VERSA",
    "MatchingNetworks",
    "MetaAlgorithm",
    "MetaSGD",
    "MetaUpdate",
    "ProtoNet",
    "Reptile",
    "SiameseNetworks",
    "SupportHallucination",
    "build_algorithm",
    "classifier_only",
    "embedding_only",
    "hyperparameters",
    "register_algorithm",
]
