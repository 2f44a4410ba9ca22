"""Data sets and task samplers: Omniglot episodes, sinusoid regression, the user's image
folders, site partitions; every data set behind :class:`FewShotSource`, found by name in the
registry (:func:`get_source`).

Pure torch/numpy (no Ray). Pillow is needed only to read image folders and to rebuild Omniglot
from the original zips, and is imported only there, lazily.
"""

from metalearn.data.class_episodes import ClassEpisodes, ClassImages, SmallClassWarning
from metalearn.data.episodes import EpisodeInfo, OmniglotEpisodes
from metalearn.data.fetch import FetchError, convert_zips_to_npz, fetch_omniglot
from metalearn.data.image_folder import ImageFolderError, load_image_folder
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
from metalearn.data.registry import get_source, register_source, source_names
from metalearn.data.sinusoid import SinusoidParams, SinusoidTasks
from metalearn.data.source import ClassSource, FewShotSource

__all__ = [
    "ClassEpisodes",
    "ClassImages",
    "ClassSource",
    "EpisodeInfo",
    "FetchError",
    "FewShotSource",
    "ImageFolderError",
    "OmniglotData",
    "OmniglotEpisodes",
    "SinusoidParams",
    "SinusoidTasks",
    "SmallClassWarning",
    "convert_zips_to_npz",
    "fetch_omniglot",
    "find_omniglot",
    "get_source",
    "load_image_folder",
    "load_omniglot",
    "partition_by_alphabet",
    "partition_devices",
    "register_source",
    "sinusoid_site_ranges",
    "source_names",
    "split_characters",
    "standard_split",
    "user_cache_dir",
]
