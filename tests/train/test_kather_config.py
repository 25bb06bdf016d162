"""The shipped Kather 2016 experiment splits the real tiles the way the data's caveats demand."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from lowmag.train.config import load_config
from lowmag.train.engine import make_runtime
from lowmag.train.experiment import Experiment

from ..conftest import SHARED_DATA

KATHER = SHARED_DATA / "kather2016"
CONFIG = Path(__file__).resolve().parents[2] / "train" / "configs" / "kather2016.toml"


@pytest.mark.skipif(not (KATHER / "tiles.csv").is_file(), reason=f"Kather 2016 tiles not found at {KATHER}")
def test_kather_split_never_separates_a_source_crop(tmp_path: Path) -> None:
    config = load_config(CONFIG, {"data": {"images": str(KATHER)}})
    exp = Experiment(config, tmp_path / "run", make_runtime(config.runtime))
    with open(KATHER / "tiles.csv", newline="") as handle:
        group_of = {(KATHER / r["path"]).resolve(): (r["label"], r["source_image"]) for r in csv.DictReader(handle)}

    parts_of_group = defaultdict(set)
    total = 0
    for part in ("labeled", "unlabeled", "val", "test"):
        for item in exp.items(part):
            parts_of_group[group_of[item.path.resolve()]].add(part)
            total += 1
            assert item.region is not None and item.region.width == 144 == item.region.height
    assert total == len(group_of) == 3784
    assert all(len(parts) == 1 for parts in parts_of_group.values())
    assert all(i.label is None for i in exp.items("unlabeled"))
    assert {exp.classes[i.label] for i in exp.items("labeled")} == set(exp.classes)
    assert {exp.classes[i.label] for i in exp.items("test")} == set(exp.classes)
    assert exp.mpp("scan/2") == pytest.approx(0.99) and exp.mpp("scan/8") == pytest.approx(3.96)


@pytest.mark.skipif(not (KATHER / "tiles.csv").is_file(), reason=f"Kather 2016 tiles not found at {KATHER}")
def test_the_headline_config_splits_exactly_as_the_full_experiment(tmp_path: Path) -> None:
    """Its rows must be comparable with the full experiment's: same tiles in every part."""
    full = load_config(CONFIG, {"data": {"images": str(KATHER)}})
    headline = load_config(CONFIG.with_name("kather2016-headline.toml"), {"data": {"images": str(KATHER)}})
    a = Experiment(full, tmp_path / "full", make_runtime(full.runtime))
    b = Experiment(headline, tmp_path / "headline", make_runtime(headline.runtime))
    for part in ("labeled", "unlabeled", "val", "test"):
        assert [i.key() for i in a.items(part)] == [i.key() for i in b.items(part)], part
    assert headline.augment.hed > 0 and headline.teacher.schedule == "cosine"
