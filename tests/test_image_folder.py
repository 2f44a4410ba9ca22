"""The user's own image folder: loading, clear errors, the sampler over unequal classes, the
data-set registry (a plugged-in data set), input shapes in models and serving signatures.

The folder is made by the test (:mod:`image_folders`): 30 classes of coloured shapes at
varied sizes, PNG and JPEG, RGB and grey, 3 to 14 images a class.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from image_folders import CLASSES, SMALL, make_image_folder
from PIL import Image

from experiments.cli import main
from experiments.config import ConfigError, parse_config
from metalearn.algorithms import ALGORITHMS, hyperparameters
from metalearn.data import image_folder
from metalearn.data.class_episodes import ClassEpisodes, ClassImages, SmallClassWarning
from metalearn.data.image_folder import ImageFolderError, load_image_folder
from metalearn.data.registry import SOURCES, get_source, register_source
from metalearn.data.source import ClassSource
from metalearn.from_config import algorithm_from_config, sampler_from_config
from metalearn.sites import plan_sites
from serve.errors import BadInput
from serve.signature import ModelSignature

HW = (20, 24)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("shapes")
    return root, make_image_folder(root)


def data_section(root: Path, /, **extra: Any) -> dict[str, Any]:
    return {"dataset": "image_folder", "root": str(root), "image_size": list(HW),
            "channels": 3, "ways": 5, "shots": 1, "queries": 5} | extra


def config(root: Path, /, **data: Any) -> dict[str, Any]:
    return {"data": data_section(root, **data), "model": {"name": "omniglot_conv", "channels": 4},
            "algorithm": {"name": "maml", "inner_lr": 0.4}}


# --------------------------------------------------------------------------------- loading

def test_loads_every_image_resized_with_the_channels_asked(
        folder: tuple[Path, dict[str, int]]) -> None:
    root, counts = folder
    rgb = load_image_folder(root, HW, channels=3)
    assert rgb.names == tuple(sorted(CLASSES))
    assert rgb.pixels.shape == (sum(counts.values()), 3, *HW) and rgb.pixels.dtype == torch.uint8
    assert dict(zip(rgb.names, rgb.counts.tolist(), strict=True)) == counts
    # A file's row is Pillow's own conversion and Lanczos resize of it (width, height order).
    c = rgb.names.index("triangle-red")
    for j, path in enumerate(sorted((root / "triangle-red").iterdir())):
        with Image.open(path) as img:
            want = np.asarray(img.convert("RGB").resize(HW[::-1], Image.Resampling.LANCZOS))
        assert np.array_equal(rgb.pixels[rgb.offsets[c] + j].permute(1, 2, 0).numpy(), want)
        if j == 3:  # saved grey: its three channels are equal
            assert torch.equal(rgb.pixels[rgb.offsets[c] + j][0], rgb.pixels[rgb.offsets[c] + j][2])
    grey = load_image_folder(root, 16, channels=1)
    assert grey.pixels.shape == (rgb.pixels.shape[0], 1, 16, 16)
    assert load_image_folder(root, HW, channels=3) is rgb  # read once per process
    (root / "notes.txt").write_text("not a class")  # files beside the classes are skipped
    assert load_image_folder(root, HW, channels=3) is rgb


def test_clear_errors_for_a_missing_folder_unreadable_images_and_too_few_classes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageFolderError, match=r"data.root: .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageFolderError, match="is not a folder"):
        load_image_folder(tmp_path / "file")
    with pytest.raises(ImageFolderError, match="holds no class folders"):
        load_image_folder(tmp_path)
    root = tmp_path / "four"
    make_image_folder(root, classes=CLASSES[:4], small=())
    (root / CLASSES[0] / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageFolderError, match=r"1 file\(s\) could not be read.*broken.png"):
        load_image_folder(root)
    (root / CLASSES[0] / "broken.png").unlink()
    before = load_image_folder(root)
    Image.new("RGB", (30, 20), (9, 9, 9)).save(root / CLASSES[0] / "new.png")
    assert load_image_folder(root) is before  # within RECHECK_S: the files are not listed
    monkeypatch.setattr(image_folder, "RECHECK_S", 0.0)
    after = load_image_folder(root)
    grown = before.names.index(CLASSES[0])
    assert after.counts[grown] == before.counts[grown] + 1
    assert after.pixels.shape[0] == 1 + before.pixels.shape[0]
    with pytest.raises(ValueError, match=r"meta-train classes\): only 0 of 3 .* 3-way tasks"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)
        sampler_from_config(data_section(root, ways=3, shots=5, queries=10))
    with pytest.raises(ValueError, match="leaves 3 meta-training classes of 4"):
        sampler_from_config(data_section(root, ways=4))
    for raw, setting in ((config(tmp_path, root=None), "data.root is required"),
                         (config(tmp_path, channels=2), "data.channels must be 1"),
                         (config(tmp_path, dataset="imagefolder"), "unknown data set")):
        with pytest.raises(ConfigError, match=re.escape(setting)):
            parse_config(raw)
    with pytest.raises(ConfigError, match=r"data\.split: Omniglot uses the standard"):
        parse_config({"data": {"dataset": "omniglot", "split": {"test_fraction": 0.1}}})


def test_the_command_line_names_a_missing_folder_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = {**config(tmp_path / "missing"), "name": "x", "output_dir": str(tmp_path / "runs")}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"edgemeta: error: data.root: {tmp_path / 'missing'} does not exist (an "
                   "image folder holds one sub-folder per class, image files inside)")


# --------------------------------------------------------------------------------- sampler

def test_small_classes_are_left_out_with_a_warning_naming_them(
        folder: tuple[Path, dict[str, int]]) -> None:
    root, _ = folder
    images = load_image_folder(root, HW, channels=3)
    with pytest.warns(SmallClassWarning, match=r"2 of 30 classes have fewer than shots \+ "
                                               r"queries = 6") as caught:
        sampler = ClassEpisodes(images, np.arange(30), ways=5, shots=1, queries=5, seed=0)
    assert all(name in str(caught[0].message) for name in SMALL)
    assert sampler.num_classes == 28
    with pytest.raises(ValueError, match="only 3 of 6 classes"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)
        ClassEpisodes(images, [images.names.index(n) for n in CLASSES[:6]], ways=5, shots=5,
                      queries=5)


def test_episodes_draw_distinct_classes_and_examples_of_unequal_classes(
        folder: tuple[Path, dict[str, int]]) -> None:
    root, _ = folder
    images = load_image_folder(root, HW, channels=3)
    big = np.flatnonzero(images.counts >= 7)
    ways, shots, queries = 5, 2, 5
    sampler = ClassEpisodes(images, big, ways, shots, queries, seed=3)
    tasks, info = sampler.sample_with_info(40)
    assert tasks.support_x.shape == (40, ways * shots, 3, *HW)
    assert tasks.query_x.shape == (40, ways * queries, 3, *HW)
    assert torch.equal(tasks.query_y[7], torch.arange(ways).repeat_interleave(queries))
    seen_classes, seen_examples = set(), set()
    for b in range(40):
        assert len(set(info.classes[b].tolist())) == ways
        for w in range(ways):
            c, ex = int(info.classes[b, w]), info.examples[b, w]
            assert len(set(ex.tolist())) == shots + queries and int(ex.max()) < images.counts[c]
            rows = images.offsets[c] + ex
            want = images.pixels[rows].float() / 255
            got = torch.cat([tasks.support_x[b, w * shots:(w + 1) * shots],
                             tasks.query_x[b, w * queries:(w + 1) * queries]])
            assert torch.equal(got, want)
            seen_classes.add(c)
            seen_examples.update((c, int(e)) for e in ex)
    assert seen_classes == set(big.tolist())  # every class, and the big ones' tails, drawn
    widest = int(np.argmax(images.counts))
    assert max(e for c, e in seen_examples if c == widest) == images.counts[widest] - 1


def test_seeded_and_resumable_like_the_omniglot_sampler(
        folder: tuple[Path, dict[str, int]]) -> None:
    root, _ = folder
    data = data_section(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)
        a, b, c = (sampler_from_config(data, "train", seed=s) for s in (7, 7, 8))
        first = a.sample(4)
        state = a.state_dict()
        rest = [a.sample(4) for _ in range(2)]
        b.load_state_dict(state)
        again = [b.sample(4) for _ in range(2)]
    assert a.episodes_sampled == 12 and state["episodes_sampled"] == 4
    for x, y in zip(rest, again, strict=True):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
    assert not torch.equal(first.support_x, c.sample(4).support_x)
    with pytest.raises(ValueError, match=r"ClassEpisodes\.state_dict"):
        b.load_state_dict({})


def test_splits_and_site_plans_hold_whole_usable_classes(
        folder: tuple[Path, dict[str, int]]) -> None:
    root, _ = folder
    data = data_section(root, split={"test_fraction": 0.2, "seed": 1})
    source = get_source(data)
    names = load_image_folder(root, HW, channels=3).names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)
        train, test = source.split_classes(data, "train"), source.split_classes(data, "test")
        plans = plan_sites(data, ["a", "b"], seed=0, holdout_fraction=0.2)
    small = {names.index(n) for n in SMALL}
    assert not set(train) & set(test) and not (set(train) | set(test)) & small
    assert len(set(train) | set(test)) == 30 - len(small)
    held = [set(p["characters"]) | set(p["holdout"]) for p in plans.values()]
    assert not held[0] & held[1] and held[0] | held[1] == set(train.tolist())
    assert all(len(p["holdout"]) >= 5 and len(p["characters"]) >= 5 for p in plans.values())
    by_name = {"test_classes": ["circle-red", "ring-blue"]}
    named = source.split_classes(data_section(root, split=by_name, ways=2), "test")
    assert [names[i] for i in named] == ["circle-red", "ring-blue"]


# ------------------------------------------------------------ shapes: models, every algorithm

@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_learns_from_rgb_non_square_images(
        folder: tuple[Path, dict[str, int]], algorithm: str) -> None:
    root, _ = folder
    raw = config(root)
    options = {"strategy": "loop"} if "strategy" in hyperparameters(algorithm) else {}
    raw["algorithm"] = {"name": algorithm, "inner_lr": 0.1, "options": options}
    cfg = parse_config(raw).to_dict()
    alg = algorithm_from_config(cfg)
    assert alg.model.input_shape == (3, *HW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)
        tasks = sampler_from_config(cfg["data"], "train", seed=0).sample(2)
    params = alg.init_params()
    update = alg.meta_update(params, tasks)
    assert update.tensors.keys() == params.keys()
    assert all(bool(torch.isfinite(t).all()) for t in update.tensors.values())
    assert any(float(t.abs().sum()) > 0 for t in update.tensors.values())


def test_serving_signature_takes_the_run_input_shape(tmp_path: Path) -> None:
    rgb = ModelSignature.from_config(parse_config(config(tmp_path)).to_dict())
    assert rgb.input_shape == (3, *HW) and rgb.ways == 5
    x = torch.rand(2, 3, *HW)
    assert torch.equal(rgb.inputs(x.tolist(), 8), x)
    with pytest.raises(BadInput, match=r"a 3-channel 20x24 image .*got shape \[20, 24\]"):
        rgb.inputs(x[:, 0].tolist(), 8)
    with pytest.raises(BadInput, match="not whole inputs of 3x20x24 values"):
        rgb.unpack("AAAAAA==", 8)
    grey = ModelSignature.from_config(parse_config(config(tmp_path, channels=1,
                                                          image_size=16)).to_dict())
    assert grey.input_shape == (1, 16, 16)
    g = torch.rand(3, 16, 16)
    assert torch.equal(grey.inputs(g.tolist(), 8), g.unsqueeze(1))
    assert torch.equal(grey.inputs(g.unsqueeze(1).tolist(), 8), g.unsqueeze(1))


# ------------------------------------------------------------------- a plugged-in data set

class ArraySource(ClassSource):
    """The docs' example: a data set held as arrays (here: random 2x8x8 images, 6 classes)."""

    name = "test_arrays"

    def images(self, data: Mapping[str, Any]) -> ClassImages:
        rng = np.random.default_rng(int(data["options"]["seed"]))
        labels = np.repeat(np.arange(6), 4 + np.arange(6))
        pixels = torch.from_numpy(rng.integers(0, 256, (labels.size, 2, 8, 8), dtype=np.uint8))
        return ClassImages.from_labels(pixels, labels, [f"k{i}" for i in range(6)])


def test_a_registered_data_set_trains_like_the_built_in_ones() -> None:
    register_source(ArraySource())
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_source(ArraySource())
        cfg = parse_config({
            "data": {"dataset": "test_arrays", "ways": 3, "shots": 1, "queries": 2,
                     "split": {"test_fraction": 0.3}, "options": {"seed": 4}},
            "model": {"name": "omniglot_conv", "channels": 4},
            "algorithm": {"name": "protonet", "inner_lr": 0.1}}).to_dict()
        alg = algorithm_from_config(cfg)
        assert alg.model.input_shape == (2, 8, 8)
        tasks = sampler_from_config(cfg["data"], "train", seed=0).sample(2)
        assert tasks.support_x.shape == (2, 3, 2, 8, 8)
        assert ModelSignature.from_config(cfg).input_shape == (2, 8, 8)
        assert torch.isfinite(alg.meta_update(alg.init_params(), tasks).tensors["features.0.0"
                                                                                ".weight"]).all()
    finally:
        SOURCES.pop("test_arrays")
