"""Data sets and task samplers: Omniglot episodes, sinusoid regression, site partitions.

Pure torch/numpy (no Ray). Pillow is needed only to rebuild Omniglot from the original zips
(:mod:`metalearn.data.fetch`), and is imported only there, lazily.
"""

from metalearn.data.episodes import EpisodeInfo, OmniglotEpisodes
from metalearn.data.fetch import FetchError, convert_zips_to_npz, fetch_omniglot
from metalearn.data.omniglot import (
    OmniglotData,
    find_omniglot,
    load_omniglot,
    split_characters,
    standard_split,
    user_cache_dir,
)
from metalearn.data.partition import (
    partition_by_alphabet,
    partition_devices,
    sinusoid_site_ranges,
)
from metalearn.data.sinusoid import SinusoidParams, SinusoidTasks

__all__ = [
    "EpisodeInfo",
    "FetchError",
    "OmniglotData",
    "OmniglotEpisodes",
    "SinusoidParams",
    "SinusoidTasks",
    "convert_zips_to_npz",
    "fetch_omniglot",
    "find_omniglot",
    "load_omniglot",
    "partition_by_alphabet",
    "partition_devices",
    "sinusoid_site_ranges",
    "split_characters",
    "standard_split",
    "user_cache_dir",
]
