"""A plain folder of one's own images gets its words from a concept set (issue 24): each stage declares what it
needs of the data, the build skips what does not apply with one sentence, and the word stages are lent by the
concept set's own bundle (same model and layer)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lavise_core.data.dataset import ImageRecord, ProbeDataset, write_dataset
from lavise_core.pipeline.stages import Stage, StageRegistry, build_stages, data_facts, skip_reason
from tests.app.app_bundles import ROOT, demo_bundle


def plain_folder(root: Path, n: int = 24, classes: int = 3) -> ProbeDataset:
    """``n`` SynthBirds test images the demo bundle holds, imported as a plain folder (no annotations)."""
    src = ProbeDataset.open(ROOT / "data" / "synthbirds")
    test = np.flatnonzero(src.splits() == "test")
    root.mkdir(parents=True)
    (root / "images").mkdir()
    recs = []
    for j, i in enumerate(test[:n]):
        name = f"images/{j:04d}.png"
        shutil.copy(src.image_path(int(i)), root / name)
        recs.append(ImageRecord(f"{j:04d}", name, "test" if j % 4 == 0 else "train", j % classes))
    return write_dataset(
        root, name="mine", source="folder", classes=[f"class {c}" for c in range(classes)], records=recs
    )


def test_data_facts_and_the_sentence_for_what_is_missing(colour_dataset, tmp_path) -> None:
    assert "classes" in data_facts(colour_dataset) and "masks" not in data_facts(colour_dataset)
    assert "masks" in data_facts(ProbeDataset.open(ROOT / "data" / "synthbirds"))
    plain = ProbeDataset(tmp_path, "mine", "folder", ["a"], [], [ImageRecord("0", "x.png", "train", 0)])
    assert data_facts(plain) == set()
    s = Stage("dissection", (), 1, lambda ctx: {}, "labels", requires=("masks", "test split"), words=True)
    why = skip_reason(s, ["masks", "test split"], "mine")
    assert why.startswith("dissection (labels) needs more than 'mine' has: its images have no region masks; ")
    assert "import a data set with masks" in why and why.endswith(
        "or name an annotated concept set with --concepts."
    )
    other = Stage("oramas", (), 1, lambda ctx: {}, "energies", requires=("classes",))
    assert "--concepts" not in skip_reason(other, ["classes"], "mine")


def test_build_skips_what_does_not_apply_and_what_needs_it(colour_dataset, identity_model, tmp_path) -> None:
    from lavise_core.pipeline.probe import open_or_create_bundle

    ran: list[str] = []

    def run(name):
        return lambda ctx: ran.append(name) or {}

    reg = StageRegistry(
        [
            Stage("a", (), 1, run("a")),
            Stage("words", ("a",), 1, run("words"), "labels", requires=("attributes",), words=True),
            Stage("after", ("words",), 1, run("after")),
            Stage("fine", ("a",), 1, run("fine"), requires=("classes",)),
        ]
    )
    b = open_or_create_bundle(tmp_path / "b", identity_model, colour_dataset)
    out = build_stages(b, colour_dataset, reg, model_loader=lambda: identity_model)
    assert ran == ["a", "fine"]
    assert (
        out["words"].startswith("not built: words (labels) needs more than") and "attributes" in out["words"]
    )
    assert out["after"] == "not built: after needs words, which was not built."
    assert not b.stage_done("words") and b.stage_done("fine")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = demo_bundle()
    if root is None:
        pytest.skip("the demo bundle is built by `make assets` (make test does it first)")
    bundles = tmp_path_factory.mktemp("bundles")
    (bundles / root.name).symlink_to(root.resolve())  # the concept set's bundle, reused as it is
    return bundles


def test_a_plain_folder_borrows_its_words_from_the_concept_set(demo_root, tmp_path) -> None:
    import lavise_core

    ds = plain_folder(tmp_path / "mine")
    assert data_facts(ds) == {"classes", "test split"}
    stages = ["probe", "textual", "dissection", "lavise", "evidence", "ood", "oramas_eval"]
    ex = lavise_core.build("synthbirds", ds.root, stages=stages, bundles=demo_root)
    built = ex.built
    for s in ("textual", "dissection", "lavise", "evidence"):
        assert built[s] == "from the concept set 'SynthBirds'", (s, built[s])
        assert ex.bundle.manifest["stages"][s]["concept_set"] == "SynthBirds"
    assert built["probe"] == "built" and built["ood"] == "built"
    assert (
        built["oramas_eval"].startswith("not built: oramas_eval")
        and "no region masks" in built["oramas_eval"]
    )
    assert "oramas_eval" not in ex.bundle.manifest["stages"]
    concept = demo_root / demo_bundle().name
    lent = ex.bundle.root / "dissection" / "iou.npy"
    assert np.array_equal(np.load(lent), np.load(concept / "dissection" / "iou.npy"))
    shown = ex.shown_labels()
    assert shown.where == "dissection on SynthBirds" and shown.confident.mean() > 0.9
    assert ex.filter_info(17).labels[0][2] == "dissection"
    ans = ex.explain(ds.image_path(0))  # the sentence reads this folder's image with the lent detectors
    assert ans.method == "evidence" and ans.sentence
    q = ex.query("red breast", n=3)  # the filters' evidence is lent, the images are this folder's
    assert q.confident and len(q.filters) and (np.asarray(q.images) < len(ds)).all()
    again = lavise_core.build("synthbirds", ds.root, stages=stages, bundles=demo_root)
    assert again.built["dissection"] == "skipped"


def test_the_cli_summary_says_where_each_stage_came_from(demo_root, tmp_path) -> None:
    ds = plain_folder(tmp_path / "mine", n=12)
    cmd = [sys.executable, "-m", "lavise_core.cli", "build", "--model", "synthbirds", "--data", str(ds.root),
           "--bundles", str(demo_root), "--stages", "probe", "dissection", "oramas_eval", "--quiet"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "dissection        from the concept set 'SynthBirds'" in out
    assert "probe             built from 'mine'" in out
    assert "not built: oramas_eval" in out and "Traceback" not in res.stderr


def test_a_concept_set_without_words_is_refused_in_plain_words(demo_root, tmp_path) -> None:
    import lavise_core

    ds = plain_folder(tmp_path / "mine", n=8)
    other = plain_folder(tmp_path / "other", n=8)
    with pytest.raises(ValueError, match="has neither region masks nor captions or attributes"):
        lavise_core.build(
            "synthbirds", ds.root, stages=["dissection"], bundles=demo_root, concepts=other.root
        )
    with pytest.raises(ValueError, match="cannot be opened"):
        lavise_core.build(
            "synthbirds", ds.root, stages=["dissection"], bundles=demo_root, concepts=tmp_path / "x"
        )
    assert json.loads((ds.root / "dataset.json").read_text())["name"] == "mine"


def test_a_concept_set_the_model_cannot_read_fails_before_anything_is_lent(demo_root, tmp_path) -> None:
    import lavise_core

    src = ProbeDataset.open(ROOT / "data" / "synthbirds")
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    for r in src.records[:6]:
        (bad / r.path).write_bytes(b"not an image")
        shutil.copy(src.root / r.mask, bad / r.mask)
    write_dataset(
        bad, name="bad", source="copy", classes=src.classes, records=src.records[:6], regions=src.regions
    )
    ds = plain_folder(tmp_path / "mine", n=8)
    with pytest.raises(Exception, match="none of the 6 images"):
        lavise_core.build("synthbirds", ds.root, stages=["dissection"], bundles=demo_root, concepts=bad)
    for m in demo_root.glob("mine-*/bundle.json"):  # this folder's bundle got nothing lent
        manifest = json.loads(m.read_text())
        if Path(manifest["dataset"]["root"]).resolve() == ds.root.resolve():
            assert "dissection" not in manifest.get("stages", {})
