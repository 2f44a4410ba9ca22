"""The flat wire format of parameters: a round trip that loses nothing, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalearn.models import OmniglotConvNet
from metalearn.params import FlatLayout, module_params


def test_pack_unpack_round_trip_is_exact_for_the_conv_net() -> None:
    params = module_params(OmniglotConvNet(ways=5, channels=8))
    layout = FlatLayout.of(params)
    flat = layout.pack(params)
    assert flat.dtype == np.float32 and flat.shape == (layout.numel,)
    assert layout.numel == sum(v.numel() for v in params.values())
    back = layout.unpack(flat)
    assert list(back) == list(params)
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_unpack_copies_so_a_read_only_buffer_is_safe() -> None:
    params = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    layout = FlatLayout.of(params)
    flat = layout.pack(params)
    flat.setflags(write=False)  # as an object-store buffer arrives
    back = layout.unpack(flat)
    back["w"].add_(1.0)  # writable, and the source is untouched
    assert flat[0] == 0.0 and float(back["w"][0, 0]) == 1.0


def test_wrong_size_or_names_are_clear_errors() -> None:
    layout = FlatLayout.of({"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="5 values does not hold 6"):
        layout.unpack(np.zeros(5, dtype=np.float32))
    with pytest.raises(KeyError, match="differ from the layout"):
        layout.pack({"v": torch.zeros(2, 3)})


def test_pack_follows_the_layout_whatever_the_key_order() -> None:
    params = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([7.0, 8.0])}
    layout = FlatLayout.of(params)
    swapped = {"b": params["b"], "w": params["w"]}
    assert np.array_equal(layout.pack(swapped), layout.pack(params))
    assert layout.pack(params).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0]
