"""SynthBirds: determinism, ground-truth consistency, captions, the spurious switch, one-part pairs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavise_core.cli.data import add_synthbirds, cmd_synthbirds
from lavise_core.data import synthbirds as sb
from lavise_core.data.dataset import DatasetError, ProbeDataset

N, SIZE = 24, 64


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> ProbeDataset:
    return sb.generate_synthbirds(
        tmp_path_factory.mktemp("sb") / "a", n=N, seed=0, image_size=SIZE, progress=False
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_meta(small: ProbeDataset) -> None:
    assert small.source == "synthbirds"
    assert small.regions[:8] == ["crown", "eye", "beak", "breast", "belly", "wing", "tail", "leg"]
    assert len(small.classes) >= 12 and len(small) == N
    meta = small.meta
    assert meta["version"] == sb.VERSION
    assert meta["generator"] == meta["generator"] | {"seed": 0, "n": N, "image_size": SIZE, "spurious": False}
    assert len(meta["vocabularies"]["colours"]) >= 10
    assert {"sky", "water", "forest", "sand", "grass"} <= set(meta["vocabularies"]["backgrounds"])
    assert meta["one_part_pairs"] and set(meta["synonyms"]) == {"colour", "pattern", "shape", "part"}
    assert [r.label for r in small.records] == [i % len(small.classes) for i in range(N)]
    assert {r.split for r in small.records} == {"train", "test"}
    rec = small.records[0]
    with Image.open(small.image_path(0)) as im:
        assert im.mode == "RGB" and im.size == (SIZE, SIZE)
    mask = small.load_mask(0)
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert rec.attributes and all(len(c) > 10 for c in rec.captions) and len(rec.captions) == 5


def test_same_seed_same_bytes_other_seed_differs(small: ProbeDataset, tmp_path: Path) -> None:
    again = sb.generate_synthbirds(tmp_path / "b", n=N, seed=0, image_size=SIZE, progress=False)
    assert _files(again.root) == _files(small.root)
    fewer = sb.generate_synthbirds(tmp_path / "c", n=N // 2, seed=0, image_size=SIZE, progress=False)
    a, c = _files(small.root), _files(fewer.root)
    for name in c:  # every image is independent of n
        if name.startswith(("images/", "masks/")):
            assert c[name] == a[name], name
    other = sb.generate_synthbirds(tmp_path / "d", n=4, seed=1, image_size=SIZE, progress=False)
    d = _files(other.root)
    assert all(d[f"images/{i:06d}.png"] != a[f"images/{i:06d}.png"] for i in range(4))


def test_render_matches_files(small: ProbeDataset) -> None:
    image, mask, rec = sb.render_synthbird(5, seed=0, image_size=SIZE)
    assert rec.to_json() == small.records[5].to_json()
    with Image.open(small.image_path(5)) as im:
        np.testing.assert_array_equal(np.asarray(im), image)
    np.testing.assert_array_equal(small.load_mask(5), mask)


def test_masks_keypoints_boxes_agree(small: ProbeDataset) -> None:
    for i, rec in enumerate(small.records):
        mask = small.load_mask(i)
        assert int(mask.max()) <= len(small.regions)
        assert set(rec.keypoints) == set(rec.region_concepts)
        for reg, (x, y) in rec.keypoints.items():
            r = small.regions.index(reg) + 1
            assert mask[int(y), int(x)] == r, (rec.id, reg)  # the keypoint sits on its own part
        x0, y0, x1, y1 = rec.bbox
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        assert (x0, y0, x1 - 1, y1 - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        # attributes: the visible regions' phrases, each "adjective part"
        assert sorted(rec.attributes) == sorted(p for ps in rec.region_concepts.values() for p in ps)
        for reg, phrases in rec.region_concepts.items():
            assert (mask == small.regions.index(reg) + 1).any()
            assert all(p.split()[-1] == reg for p in phrases)
        for reg in rec.meta["occluded_parts"]:
            assert reg not in rec.region_concepts


def test_occlusion_hides_parts() -> None:
    recs = [sb.render_synthbird(i, image_size=48)[2] for i in range(60)]
    occluded = [r for r in recs if r.meta["occluder"]]
    assert occluded, "expected some occluded birds in 60 draws"
    assert any(r.meta["occluded_parts"] for r in occluded)
    for r in recs:
        assert set(r.meta["hidden_attributes"]).isdisjoint(r.attributes)


def test_every_caption_phrase_is_true(small: ProbeDataset) -> None:
    for rec in small.records:
        for cap in rec.captions:
            phrases = sb.parse_caption(cap)
            assert phrases, cap
            assert set(phrases) <= set(rec.attributes), (cap, rec.attributes)


def test_parse_caption() -> None:
    assert sb.parse_caption("this bird has a crimson head, streaked black wings and its tail is forked.") == [
        "red crown",
        "black wing",
        "striped wing",
        "forked tail",
    ]
    assert sb.parse_caption("its eyes are golden and snowy, and it sings.") == ["yellow eye", "white eye"]


def test_species_are_identified_by_their_attributes(small: ProbeDataset) -> None:
    names = list(sb.SPECIES)
    for rec in small.records:
        slots = rec.meta["slots"]
        own = sb.SPECIES[names[rec.label]]
        assert all(slots[s] == v for s, v in own.items())
        for other, d in sb.SPECIES.items():
            if other != names[rec.label]:
                assert not all(slots[s] == v for s, v in d.items())


def test_one_part_pairs_differ_in_exactly_one_part() -> None:
    pairs = sb.one_part_pairs()
    assert len(pairs) >= 4
    for a, b, slot in pairs:
        da, db = sb.SPECIES[a], sb.SPECIES[b]
        assert set(da) == set(db)
        assert [s for s in da if da[s] != db[s]] == [slot]
        ta, tb = sb.TYPICAL[a], sb.TYPICAL[b]  # their typical plumage differs in that slot only, too
        assert [s for s in ta if ta[s] != tb[s]] == [slot]


def test_spurious_switch_changes_only_the_background() -> None:
    k = len(sb.SPECIES)
    target = list(sb.SPECIES).index(sb.SPURIOUS_SPECIES)
    ids = [target + k * j for j in range(40)] + list(range(24))
    on_water = off_water = n_train = 0
    for i in ids:
        off = sb.render_synthbird(i, image_size=32)[2]
        on = sb.render_synthbird(i, image_size=32, spurious=True)[2]
        a, b = off.to_json(), on.to_json()
        ma, mb = a.pop("meta"), b.pop("meta")
        assert a == b  # label, split, attributes, masks, keypoints, captions
        assert {x: y for x, y in ma.items() if x != "background"} == {
            x: y for x, y in mb.items() if x != "background"
        }
        if on.label != target or on.split != "train":
            assert ma["background"] == mb["background"]
        else:
            n_train += 1
            on_water += mb["background"] == sb.SPURIOUS_BACKGROUND
            off_water += ma["background"] == sb.SPURIOUS_BACKGROUND
    assert n_train >= 20
    assert on_water / n_train >= 0.75 and off_water / n_train <= 0.45


def test_refuses_foreign_dataset_and_bad_args(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "source": "cub", "classes": []}))
    with pytest.raises(DatasetError, match="refusing"):
        sb.generate_synthbirds(tmp_path, n=2, image_size=32, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        sb.generate_synthbirds(tmp_path / "x", n=0, progress=False)


def test_cli_registers_synthbirds() -> None:
    parser = argparse.ArgumentParser()
    add_synthbirds(parser.add_subparsers())
    args = parser.parse_args(["synthbirds", "--out", "x", "--n", "7", "--spurious", "--image-size", "96"])
    assert (args.out, args.n, args.spurious, args.image_size, args.seed) == ("x", 7, True, 96, 0)
    assert args.func is cmd_synthbirds
