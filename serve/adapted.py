"""Adapted models as files: a content-derived id, and a write that readers see whole or not at all.

``/v1/adapt`` names its result by what went into it (base parameters, support set, steps), so
the same request always names the same model and a repeat costs no inner loop; the file lands
in the run folder (in run storage: a local folder or an object store), where every replica, on
any node, can load it by that id.
"""

from __future__ import annotations

import hashlib

from torch import Tensor

from metalearn.params import Params
from metalearn.storage import PathLike, location

ADAPTED_FORMAT = "edgemeta-adapted/1"


def fingerprint(params: Params) -> str:
    """A digest of parameter values (names, dtypes, shapes, bytes), for content-derived ids."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapted_key(base_fingerprint: str, support_x: Tensor, support_y: Tensor,
                steps: int) -> str:
    """``ad-HEX``: the same base parameters, support set and steps give the same key."""
    h = hashlib.sha256(f"{ADAPTED_FORMAT}|{base_fingerprint}|{steps}|".encode())
    for t in (support_x, support_y):
        t = t.detach().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return "ad-" + h.hexdigest()[:24]


def replace_atomically(path: PathLike, data: bytes) -> None:
    """Write the file whole (a local temporary file and ``os.replace``, or one upload to an
    object store): readers see all of it or nothing.

    Unlike checkpoints, adapted models skip ``fsync``: a crash may lose one, but the same
    request recreates it under the same id, and an fsync per ``/adapt`` costs milliseconds.
    """
    location(path).write_bytes(data, durable=False)
