"""The bundle selector's rules (lavise_core.views.workspace) on hand-built bundle manifests: which bundle opens
first, and labels that stay unique."""

from __future__ import annotations

import pytest

from lavise_core.pipeline.bundle import Bundle
from lavise_core.views import bundle_label, default_bundle, unique_bundle_labels


def _bundle(
    tmp_path, name: str, spec: str, stages=(), created: str = "2024-01-01T00:00:00", data="d"
) -> Bundle:
    b = Bundle.create(
        tmp_path / name,
        {"key": name, "created": created, "dataset": {"name": "SynthBirds", "root": f"/x/{data}"},
         "model": {"spec": spec}, "layer": "features"},
    )  # fmt: skip
    for s in stages:
        b.mark_stage(s)
    return b


def test_default_bundle_prefers_the_demo_bundle_with_most_stages(tmp_path):
    newer = _bundle(tmp_path, "r18", "torchvision:resnet18", ("probe", "textual", "lavise"), "2025-06-01")
    demo_probe = _bundle(tmp_path, "demo1", "synthbirds", ("probe",), "2025-03-01")
    demo_full = _bundle(tmp_path, "demo2", "synthbirds", ("probe", "textual", "lavise"), "2024-01-01")
    demo_two = _bundle(tmp_path, "demo3", "synthbirds", ("probe", "textual"), "2025-05-01")
    bundles = [newer, demo_probe, demo_full, demo_two]
    assert default_bundle(bundles) is demo_full  # a demo bundle beats a newer, complete other bundle
    assert default_bundle([newer, demo_probe, demo_two]) is demo_two  # most stages before newest
    assert default_bundle([demo_probe]) is demo_probe


def test_default_bundle_without_a_demo_bundle_is_the_newest_of_the_most_complete(tmp_path):
    old = _bundle(tmp_path, "a", "torchvision:resnet18", ("probe", "textual"), "2024-01-01T00:00:00")
    new = _bundle(tmp_path, "b", "torchvision:resnet50", ("probe", "textual"), "2024-02-01T00:00:00")
    newest = _bundle(tmp_path, "c", "efficientnet_lite0", ("probe",), "2025-01-01T00:00:00")
    assert default_bundle([old, new, newest]) is new
    assert default_bundle([old, newest]) is old
    assert default_bundle([newest]) is newest
    with pytest.raises(ValueError):
        default_bundle([])


def test_bundle_labels_are_unique(tmp_path):
    """Two bundles of one data set name, model and layer (e.g. SynthBirds with the switch on and off) must
    stay two choices: the sidebar's selectbox matches the chosen option by its label."""
    a = _bundle(tmp_path, "a1", "synthbirds", data="synthbirds")
    b = _bundle(tmp_path, "b2", "synthbirds", data="synthbirds-spurious")
    c = _bundle(tmp_path, "c3", "synthbirds", data="synthbirds")
    labels = unique_bundle_labels([a, b, c])
    assert len(set(labels.values())) == 3
    assert labels[str(b.root)].endswith("· synthbirds-spurious")
    assert labels[str(a.root)].endswith("· synthbirds · a1")
    assert unique_bundle_labels([a]) == {str(a.root): bundle_label(a)}  # alone: nothing added


def test_bundle_label_names_data_model_layer_and_stages(tmp_path):
    b = _bundle(tmp_path, "x", "checkpoint:/m/tiny_net.safetensors?arch=a", ("probe", "lavise", "oramas"))
    assert bundle_label(b) == "SynthBirds · tiny_net · features [probe, lavise]"
    assert bundle_label(_bundle(tmp_path, "y", "synthbirds")) == "SynthBirds · synthbirds · features [empty]"
