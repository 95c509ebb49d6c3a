"""'Where does it look?': the method choice in the URL and the stored numbers in plain words."""

from __future__ import annotations

from lavise_core import views

STORED = {
    "images": 32,
    "random": {"deletion_auc": 0.07, "insertion_auc": 0.64},
    "baselines": {"pointing_uniform": 0.05, "pointing_on_bird": 0.4, "energy_uniform": 0.05},
    "sanity_layers": ["classifier", "features.18"],
    "methods": {
        "gradcam": {"deletion_auc": 0.05, "insertion_auc": 0.7, "pointing": 0.3, "energy": 0.2,
                    "sanity": [0.9, 0.1], "sanity_mean": 0.5, "seconds_per_image": 0.004},
        "saliency": {"deletion_auc": 0.04, "insertion_auc": 0.8, "pointing": 0.6, "energy": 0.3,
                     "sanity": [0.5, 0.2], "sanity_mean": 0.35, "seconds_per_image": 0.02},
    },
    "winners": {"deletion_auc": "saliency", "insertion_auc": "saliency", "pointing": "saliency", "energy": "saliency",
                "sanity": "saliency"},
}  # fmt: skip


def test_methods_round_trip_through_the_url() -> None:
    assert views.parse_methods(None) == ["gradcam"]
    assert views.parse_methods("saliency, gradcam,bogus,saliency") == ["saliency", "gradcam"]
    assert views.parse_methods("bogus") == ["gradcam"]
    chosen = ["occlusion", "gradcam_pp"]
    assert views.parse_methods(views.methods_param(chosen)) == chosen


def test_stored_numbers_in_rows_and_sentences() -> None:
    rows = views.attribution_rows(STORED)
    assert [r["method"] for r in rows] == [
        "Grad-CAM",
        "Gradient saliency",
        "baseline (random order / uniform map)",
    ]
    assert rows[-1]["deletion AUC ↓"] == "0.070" and rows[-1]["pointing game ↑"] == "0.050"
    text = " ".join(views.attribution_findings(STORED))
    assert "**Gradient saliency** 0.040 vs random order 0.070" in text
    assert "FAILED" in text and "Grad-CAM." in text and "passed: Gradient saliency" in text
    f = {
        **STORED["methods"]["gradcam"],
        "random": STORED["random"],
        "baselines": STORED["baselines"],
        "images": 32,
    }
    line = views.faithfulness_text(f)
    assert line.startswith("On 32 held-out test images") and "random order 0.070" in line and "FAILS" in line
    assert views.sanity_rows(STORED)[1] == {
        "method": "Gradient saliency",
        "+classifier": 0.5,
        "+features.18": 0.2,
    }
