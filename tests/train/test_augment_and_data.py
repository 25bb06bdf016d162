"""Augmentation, data items and splits, the pixel cache and the experiment config."""

import csv
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowmag.errors import LowmagError, SpecError
from lowmag.labeled import Item, scan_image_folder
from lowmag.reader import Region, read_at_mpp
from lowmag.slide import open_slide
from lowmag.train import augment
from lowmag.train.augment import AugmentConfig, AugmentParams
from lowmag.train.cache import build_cache, channel_stats
from lowmag.train.config import load_config
from lowmag.train.data import split_by_group

REPO = Path(__file__).resolve().parents[2]


def _downsample(image):
    """2x average pooling of a (3, H, W) image: what a lower resolution of the same tissue is."""
    return F.avg_pool2d(image.unsqueeze(0), 2).squeeze(0)


def _mid_grey_image(seed=0, size=(3, 16, 12)):
    """Values in 0.3-0.7, so a small colour jitter never reaches the 0/1 clamp."""
    return 0.3 + 0.4 * torch.rand(size, generator=torch.Generator().manual_seed(seed))


# --- augmentation --------------------------------------------------------------------------


def test_identity_params_leave_the_image_unchanged():
    image = torch.rand(3, 10, 7, generator=torch.Generator().manual_seed(0))
    out = augment.apply(image, augment.identity())
    assert torch.equal(out, image)
    assert out is not image


@pytest.mark.parametrize("rotations", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_flips_and_rotations_commute_with_downsampling(rotations, flip):
    image = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(1))
    params = AugmentParams(rotations, flip, torch.eye(3), 1.0)
    big_then_small = _downsample(augment.apply(image, params))
    small_then_aug = augment.apply(_downsample(image), params)
    assert big_then_small.shape == small_then_aug.shape
    # The same four pixels are averaged, only possibly summed in another order.
    torch.testing.assert_close(big_then_small, small_then_aug, rtol=0, atol=1e-7)


def test_rot90_and_flip_move_pixels_as_expected():
    image = torch.arange(3 * 2 * 3, dtype=torch.float32).reshape(3, 2, 3) / 20
    rotated = augment.apply(image, AugmentParams(1, False, torch.eye(3), 1.0))
    assert rotated.shape == (3, 3, 2)
    assert float(rotated[0, 0, 0]) == float(image[0, 0, 2])  # counter-clockwise: top-right goes top-left
    flipped = augment.apply(image, AugmentParams(0, True, torch.eye(3), 1.0))
    assert torch.equal(flipped[:, :, 0], image[:, :, 2])


@pytest.mark.parametrize("seed", range(6))
def test_colour_and_contrast_commute_with_downsampling(seed):
    image = _mid_grey_image(seed)
    config = AugmentConfig(brightness=0.05, contrast=0.05, saturation=0.05, hue=0.01, hed=0.0, hed_bias=0.0)
    params = augment.draw(config, torch.Generator().manual_seed(seed))
    assert not torch.equal(params.colour, torch.eye(3))
    big = augment.apply(image, params)
    assert 0.0 < float(big.min()) and float(big.max()) < 1.0  # no clamping happened
    torch.testing.assert_close(_downsample(big), augment.apply(_downsample(image), params), rtol=0, atol=1e-5)


def _he_tile(synthetic_slide) -> torch.Tensor:
    """Real-looking H&E pixels at full resolution (the synthetic slide's stained tissue)."""
    with open_slide(synthetic_slide) as slide:
        rgb = read_at_mpp(slide, 0.5, Region(400, 500, 128, 128), exact=True)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


def test_stain_jitter_changes_each_stain_and_nothing_else_when_neutral(synthetic_slide):
    image = _he_tile(synthetic_slide)
    torch.testing.assert_close(augment.stain_jitter(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), image, rtol=0,
                               atol=1e-5)
    more_eosin = augment.stain_jitter(image, (1.0, 1.3, 1.0), (0.0, 0.0, 0.0))
    od = lambda x: -torch.log10(x.clamp(min=1 / 255))  # noqa: E731
    hed = torch.einsum("chw,cs->shw", od(more_eosin) - od(image), augment._HED_FROM_RGB)
    assert float(hed[1].mean()) > 0.02 and abs(float(hed[0].mean())) < 1e-4  # eosin up, haematoxylin untouched


def test_stain_jitter_commutes_with_downsampling_up_to_a_measured_error(synthetic_slide):
    """It is linear in optical density, not in RGB: averaging then jittering differs from
    jittering then averaging. On H&E-like tissue, jittered ±5 % and ±0.05 OD per stain and
    downsampled 4x, the difference was 0.16/255 on average and 7.7/255 at most (at nuclear
    edges, where averaging mixes dark and light): far below the jitter itself."""
    image = _he_tile(synthetic_slide)
    config = AugmentConfig(flips=False, rot90=False, brightness=0, contrast=0, saturation=0, hue=0, hed=0.05,
                           hed_bias=0.05)
    errors = []
    for seed in range(8):
        params = augment.draw(config, torch.Generator().manual_seed(seed))
        assert params.stains
        big_then_small = _downsample(_downsample(augment.apply(image, params)))
        small_then_jitter = augment.apply(_downsample(_downsample(image)), params)
        errors.append((big_then_small - small_then_jitter).abs())
    mean, worst = float(torch.stack(errors).mean()), float(torch.stack(errors).max())
    assert mean < 0.5 / 255 and worst < 12 / 255, (mean * 255, worst * 255)


def test_configs_without_stain_jitter_draw_the_same_augmentations_as_before():
    before = augment.draw(AugmentConfig(hed=0.0, hed_bias=0.0), torch.Generator().manual_seed(3))
    assert not before.stains and before.stain_scale == (1.0, 1.0, 1.0)
    # the default recipe jitters the stains and draws them after everything else, so the
    # geometry and RGB colour of a draw are those of the recipe before it
    now = augment.draw(AugmentConfig(), torch.Generator().manual_seed(3))
    assert now.stains
    assert (now.rotations, now.flip, now.contrast) == (before.rotations, before.flip, before.contrast)
    assert torch.equal(now.colour, before.colour)


def test_hue_and_saturation_leave_grey_unchanged_brightness_scales_it():
    grey = torch.full((3, 4, 4), 0.5)
    params = augment.draw(
        AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.3, hue=0.2, hed=0.0, hed_bias=0.0),
        torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(augment.apply(grey, params), grey, rtol=0, atol=1e-5)
    brighter = AugmentParams(0, False, 1.2 * torch.eye(3), 1.0)
    torch.testing.assert_close(augment.apply(grey, brighter), torch.full((3, 4, 4), 0.6))


def test_contrast_stretches_about_the_image_mean():
    image = torch.tensor([0.2, 0.4, 0.6, 0.8]).reshape(1, 2, 2).repeat(3, 1, 1)
    out = augment.apply(image, AugmentParams(0, False, torch.eye(3), 1.5))
    expected = (image - 0.5) * 1.5 + 0.5  # mean 0.5; 0.2 -> 0.05, 0.8 -> 0.95
    torch.testing.assert_close(out, expected)


def test_same_seed_gives_same_params_and_switched_off_ranges_do_nothing():
    config = AugmentConfig()
    a = augment.draw(config, torch.Generator().manual_seed(7))
    b = augment.draw(config, torch.Generator().manual_seed(7))
    assert (a.rotations, a.flip, a.contrast) == (b.rotations, b.flip, b.contrast)
    assert torch.equal(a.colour, b.colour)
    draws = [augment.draw(config, torch.Generator().manual_seed(s)) for s in range(20)]
    assert len({(d.rotations, d.flip, round(d.contrast, 6)) for d in draws}) > 1
    off = AugmentConfig(flips=False, rot90=False, brightness=0, contrast=0, saturation=0, hue=0, hed=0, hed_bias=0)
    for s in range(5):
        p = augment.draw(off, torch.Generator().manual_seed(s))
        assert (p.rotations, p.flip, p.contrast) == (0, False, 1.0) and not p.stains
        torch.testing.assert_close(p.colour, torch.eye(3), rtol=0, atol=1e-5)


# --- splits --------------------------------------------------------------------------------


def _synthetic_items(groups_per_class=(8, 10, 12, 2), seed=0):
    """Items of four classes; each group holds 1-4 images; the last class has only 2 groups."""
    rng = np.random.default_rng(seed)
    items, i = [], 0
    for label, n_groups in enumerate(groups_per_class):
        for g in range(n_groups):
            for _ in range(int(rng.integers(1, 5))):
                items.append(Item(Path(f"x/{i}.png"), label, f"class{label}-source{g}"))
                i += 1
    return items


FRACTIONS = {"train": 0.6, "test": 0.2, "val": 0.2}


def _as_keys(parts):
    return {name: [item.key() for item in items] for name, items in parts.items()}


def test_split_keeps_groups_whole_and_every_class_in_every_part():
    items = _synthetic_items()
    parts = split_by_group(items, FRACTIONS, seed=0)
    assert list(parts) == ["train", "test", "val"]
    all_keys = sorted(k for keys in _as_keys(parts).values() for k in keys)
    assert all_keys == sorted(item.key() for item in items)  # each item exactly once
    part_of_group = defaultdict(set)
    for name, part in parts.items():
        for item in part:
            part_of_group[item.group].add(name)
    assert all(len(names) == 1 for names in part_of_group.values())
    groups_of_class = Counter(label for label, _ in {(i.label, i.group) for i in items})
    for label, n_groups in groups_of_class.items():
        if n_groups >= 3:
            for name, part in parts.items():
                assert any(item.label == label for item in part), (label, name)
    # Fractions of the items, roughly (whole groups of up to 4 images move together).
    n = len(items)
    for name, fraction in FRACTIONS.items():
        assert abs(len(parts[name]) / n - fraction) < 0.08, (name, len(parts[name]), n)


def test_class_with_fewer_groups_than_parts_fills_the_first_parts():
    items = _synthetic_items()
    parts = split_by_group(items, FRACTIONS, seed=0)
    parts_with_class3 = [name for name, part in parts.items() if any(i.label == 3 for i in part)]
    assert parts_with_class3 == ["train", "test"]


def test_split_is_deterministic_for_a_seed_and_varies_with_it():
    items = _synthetic_items()
    first = _as_keys(split_by_group(items, FRACTIONS, seed=5))
    assert _as_keys(split_by_group(list(items), FRACTIONS, seed=5)) == first
    others = [_as_keys(split_by_group(items, FRACTIONS, seed=s)) for s in (6, 7)]
    assert any(other != first for other in others)


@pytest.mark.parametrize("fractions", [{}, {"train": -0.1, "test": 1.0}, {"train": 0.0, "test": 0.0}])
def test_split_refuses_bad_fractions(fractions):
    with pytest.raises(LowmagError, match="fractions"):
        split_by_group(_synthetic_items(), fractions, seed=0)


# --- image folders -------------------------------------------------------------------------


def _write_png(path, width, height, seed=0):
    import pyvips

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pyvips.Image.new_from_array(pixels).pngsave(str(path))
    return path


@pytest.fixture()
def image_folder(tmp_path):
    """tumor/ (3 images of 2 sources) and stroma/ (2 images of 1 source), a CSV and a stray file."""
    root = tmp_path / "tiles"
    _write_png(root / "tumor" / "t1.png", 20, 20, seed=1)
    _write_png(root / "tumor" / "t2.png", 24, 16, seed=2)
    _write_png(root / "tumor" / "t3.png", 20, 20, seed=3)
    _write_png(root / "stroma" / "s1.png", 20, 20, seed=4)
    _write_png(root / "stroma" / "s2.png", 20, 20, seed=5)
    (root / "tumor" / "notes.txt").write_text("not an image")
    rows = [
        ("tumor/t1.png", "tumor", "A"),
        ("tumor/t2.png", "tumor", "A"),
        ("tumor/t3.png", "tumor", "B"),
        ("stroma/s1.png", "stroma", "C"),
        ("stroma/s2.png", "stroma", "C"),
    ]
    with open(root / "tiles.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "source_image"])
        writer.writerows(rows)
    return root


def test_scan_image_folder_reads_classes_groups_and_crops(image_folder):
    classes, items = scan_image_folder(
        image_folder, scan_mpp=0.5, metadata="tiles.csv", group_by=["label", "source_image"], crop_px=10
    )
    assert classes == ("stroma", "tumor")
    got = {item.path.relative_to(image_folder).as_posix(): item for item in items}
    assert sorted(got) == ["stroma/s1.png", "stroma/s2.png", "tumor/t1.png", "tumor/t2.png", "tumor/t3.png"]
    assert [got[k].label for k in sorted(got)] == [0, 0, 1, 1, 1]
    assert got["tumor/t1.png"].group == got["tumor/t2.png"].group == "tumor|A"
    assert got["tumor/t3.png"].group == "tumor|B"
    assert got["stroma/s2.png"].group == "stroma|C"
    assert got["tumor/t1.png"].region == Region(5, 5, 10, 10)  # centred in 20x20
    assert got["tumor/t2.png"].region == Region(7, 3, 10, 10)  # centred in 24x16
    assert all(item.scan_mpp == 0.5 for item in items)


def test_scan_image_folder_without_metadata_makes_each_file_its_group(image_folder):
    classes, items = scan_image_folder(image_folder, scan_mpp=0.5, classes=["tumor", "stroma"])
    assert classes == ("tumor", "stroma")  # the given order fixes the labels
    assert {i.path.name: i.label for i in items}["s1.png"] == 1
    assert len({i.group for i in items}) == len(items) == 5
    assert all(i.region is None for i in items)


def test_scan_image_folder_refuses_an_image_without_a_csv_row(image_folder):
    _write_png(image_folder / "tumor" / "t4.png", 20, 20)
    with pytest.raises(LowmagError, match=r"tiles\.csv.*tumor/t4\.png"):
        scan_image_folder(image_folder, scan_mpp=0.5, metadata="tiles.csv", group_by=["source_image"])


def test_scan_image_folder_refuses_unknown_class_folder(image_folder):
    _write_png(image_folder / "necrosis" / "n1.png", 20, 20)
    with pytest.raises(LowmagError, match="necrosis") as error:
        scan_image_folder(image_folder, scan_mpp=0.5, classes=["stroma", "tumor"])
    assert str(image_folder) in str(error.value)


def test_scan_image_folder_refuses_a_single_class(tmp_path):
    _write_png(tmp_path / "only" / "tumor" / "t1.png", 20, 20)
    with pytest.raises(LowmagError, match="at least two") as error:
        scan_image_folder(tmp_path / "only", scan_mpp=0.5)
    assert str(tmp_path / "only") in str(error.value)


def test_scan_image_folder_refuses_a_crop_larger_than_an_image(image_folder):
    with pytest.raises(LowmagError, match="t2.png"):
        scan_image_folder(image_folder, scan_mpp=0.5, crop_px=18)  # t2 is only 16 px high


# --- pixel cache ---------------------------------------------------------------------------


@pytest.fixture()
def cache_items(tmp_path):
    a = _write_png(tmp_path / "img" / "a.png", 40, 40, seed=10)
    b = _write_png(tmp_path / "img" / "b.png", 36, 44, seed=11)
    return [
        Item(a, 0, "a", None, 0.5),
        Item(b, 1, "b", None, 0.5),
        Item(a, 0, "a", Region(8, 4, 20, 24), 0.5),
    ]


def test_cache_holds_what_the_core_reader_returns(tmp_path, cache_items):
    calls = []
    cache = build_cache(cache_items, 1.0, tmp_path / "cache", progress=calls.append)
    assert calls == [1, 1, 1]
    assert len(cache) == 3 and cache.mpp == 1.0
    expected_shapes = [(20, 20, 3), (22, 18, 3), (12, 10, 3)]  # half of each side at 2x the µm/px
    for i, item in enumerate(cache_items):
        with open_slide(item.path, assume_mpp=0.5) as slide:
            expected = read_at_mpp(slide, 1.0, item.region, exact=True)
        assert cache[i].shape == expected_shapes[i]
        np.testing.assert_array_equal(cache[i], expected)
    assert cache.uniform_shape is None
    mean, std = channel_stats(cache)
    pixels = np.concatenate([cache[i].reshape(-1, 3) for i in range(3)]).astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-5)


def test_cache_is_reused_without_reading_and_keyed_by_mpp_and_files(tmp_path, cache_items, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = build_cache(cache_items, 1.0, cache_dir)
    stamp = os.stat(first.folder / "pixels.bin").st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache re-read an image")

    with monkeypatch.context() as patch:
        patch.setattr("lowmag.reader.read_at_mpp", no_reading)  # Item.read imports it per call
        calls = []
        again = build_cache(cache_items, 1.0, cache_dir, progress=calls.append)
    assert calls == [3]  # the whole total at once
    assert again.folder == first.folder
    assert os.stat(again.folder / "pixels.bin").st_mtime_ns == stamp
    np.testing.assert_array_equal(again[1], first[1])

    coarser = build_cache(cache_items, 2.0, cache_dir)
    assert coarser.folder != first.folder
    assert coarser[0].shape == (10, 10, 3)
    # A changed image file makes a new cache instead of reusing the stale one.
    _write_png(cache_items[1].path, 30, 30, seed=99)
    changed = build_cache(cache_items, 1.0, cache_dir)
    assert changed.folder != first.folder
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        p.name for p in (first.folder, coarser.folder, changed.folder)
    )  # no staging folders left behind


def test_image_rewritten_in_the_same_process_is_read_afresh(tmp_path, cache_items):
    build_cache(cache_items, 1.0, tmp_path / "cache")
    _write_png(cache_items[1].path, 30, 30, seed=99)
    changed = build_cache(cache_items, 1.0, tmp_path / "cache")
    assert changed[1].shape == (15, 15, 3)


# --- experiment config ---------------------------------------------------------------------

MINIMAL = """
[data]
images = "tiles"
scan_mpp = 0.495
"""


def test_minimal_config_loads_with_defaults(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(MINIMAL)
    config = load_config(path)
    assert config.data.scan_mpp == 0.495
    assert config.architecture == "resnet18"
    assert config.student_resolutions == ("scan/2", "scan/4", "scan/8")
    assert config.data.split == {"train": 0.6, "test": 0.2, "val": 0.2}
    assert config.path(config.data.images) == tmp_path / "tiles"
    overridden = load_config(path, {"teacher": {"epochs": 2}, "data": {"crop_px": 144}})
    assert overridden.teacher.epochs == 2 and overridden.data.crop_px == 144
    assert overridden.data.scan_mpp == 0.495  # a nested override keeps the table's other keys


def test_shipped_kather_config_loads():
    config = load_config(REPO / "train" / "configs" / "kather2016.toml")
    assert config.data.group_by == ("label", "source_image")
    assert config.distill.ablation == ("maxpool", "bicubic", "none")


BROKEN = """
name = "broken"
epochz = 3
student_resolutions = ["scan/2", "20q"]

[data]
images = "tiles"

[teacher]
epochs = "ten"

[distill]
pixel = "bilinear"
"""


def test_every_config_problem_is_reported_in_one_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    with pytest.raises(SpecError) as caught:
        load_config(path)
    error = caught.value
    message = str(error)
    assert str(path) in message
    expected = {
        "epochz": "unknown key",
        "teacher.epochs": "'ten'",
        "data.scan_mpp": "required for an image folder",
        "20q": "cannot read resolution",
        "bilinear": "pixel mode",
    }
    assert len(error.problems) == len(expected), error.problems
    for name, what in expected.items():
        assert any(name in p and what in p for p in error.problems), (name, error.problems)
        assert name in message


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="absent.toml: file not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match="bad.toml: not valid TOML"):
        load_config(bad)
    not_a_table = tmp_path / "flat.toml"
    not_a_table.write_text('data = "tiles"\n')
    with pytest.raises(SpecError) as caught:
        load_config(not_a_table)
    assert "data: expected a table" in caught.value.problems
