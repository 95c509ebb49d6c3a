"""Exact merges of the sharded probe pass, without Ray: ties, histograms, shards run in this process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavise_core.pipeline.executor import ExecutorError, ExecutorSettings, map_shards, shard_rows
from lavise_core.pipeline.probe import (
    ProbeSettings,
    StreamingHistogram,
    TopKMaps,
    open_or_create_bundle,
    run_probe,
    run_probe_sharded,
)


def test_topk_ties_go_to_the_earlier_image_in_any_merge_order():
    pooled = torch.tensor([[1.0], [2.0], [2.0], [0.0], [2.0], [1.0]])  # (6 images, 1 filter)
    maps = pooled.view(6, 1, 1, 1)
    one = TopKMaps(1, 3, (1, 1))
    for s in (0, 2, 4):  # batches of two
        one.update(pooled[s : s + 2], maps[s : s + 2], torch.arange(s, s + 2))
    assert one.index.tolist() == [[1, 2, 4]] and one.values.tolist() == [[2.0, 2.0, 2.0]]
    shards = []
    for s in (0, 3):
        t = TopKMaps(1, 3, (1, 1))
        t.update(pooled[s : s + 3], maps[s : s + 3], torch.arange(s, s + 3))
        shards.append(t)
    for order in ([0, 1], [1, 0]):
        merged = TopKMaps(1, 3, (1, 1))
        for j in order:
            merged.merge(shards[j].values, shards[j].index, shards[j].maps)
        assert merged.index.tolist() == one.index.tolist()
        assert torch.equal(merged.maps, one.maps)


def test_topk_merge_keeps_empty_slots_first_among_minus_inf():
    a, b = TopKMaps(1, 3, (1, 1)), TopKMaps(1, 3, (1, 1))
    a.update(torch.tensor([[float("-inf")], [5.0]]), torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]))
    b.update(torch.tensor([[float("-inf")]]), torch.zeros(1, 1, 1, 1), torch.tensor([2]))
    a.merge(b.values, b.index, b.maps)
    assert a.index.tolist() == [[1, -1, -1]]


def test_histogram_shards_from_one_origin_merge_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(4, 50, generator=g) * (1 + 3 * i) for i in range(6)
    ]  # the range grows: bins double
    one = StreamingHistogram(4, 64)
    for v in batches:
        one.update(v)
    first = StreamingHistogram(4, 64)
    first.update(batches[0])
    merged = StreamingHistogram(4, 64)
    for part in (batches[:1], batches[1:2], batches[2:]):  # shards of different widths
        h = StreamingHistogram.starting_at(first.lo, first.width, 64)
        for v in part:
            h.update(v)
        merged.merge(h)
    assert torch.equal(merged.width, one.width) and torch.equal(merged.counts, one.counts)
    np.testing.assert_array_equal(merged.quantiles([0.5, 0.995]), one.quantiles([0.5, 0.995]))
    other = StreamingHistogram.starting_at(first.lo + 1, first.width, 64)
    other.update(batches[0])
    with pytest.raises(ValueError, match="different origins"):
        merged.merge(other)


def test_sharded_pass_in_process_equals_single_pass(tmp_path, identity_model, colour_dataset):
    """Solid colours tie (several images have 0 in a channel); one corrupt image; shards of one batch."""
    st = ProbeSettings(top_k=4, batch_size=2, num_workers=0, histogram_bins=64, progress=False)
    single = run_probe(open_or_create_bundle(tmp_path / "a", identity_model, colour_dataset), identity_model,
                       colour_dataset, st)  # fmt: skip
    seen = []
    sharded = run_probe_sharded(
        open_or_create_bundle(tmp_path / "b", identity_model, colour_dataset), identity_model, colour_dataset,
        st, ExecutorSettings(kind="local", shard_batches=1), on_progress=lambda d, n: seen.append(d),
    )  # fmt: skip
    for name in ("pooled", "logits", "valid", "top_index", "top_value", "top_maps", "quantiles", "threshold"):
        assert np.array_equal(single.array(f"probe/{name}"), sharded.array(f"probe/{name}")), name
    assert single.read_json("probe/failures") == sharded.read_json("probe/failures") != {}
    assert seen == [2, 4, 6, 7]
    top = np.asarray(single.array("probe/top_index"))
    assert top[2].tolist()[:2] == [2, 3]  # blue: 255 (image 2), then 50 (image 3); ties at 0 by image order


def test_shards_and_settings():
    assert [s.tolist() for s in shard_rows(range(7), 2, 2)] == [[0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(ExecutorError, match="unknown executor"):
        ExecutorSettings(kind="dask")

    class Echo:
        device = "unset"

        def setup(self, device):
            self.device = device

        def __call__(self, rows):
            return rows.sum()

    task = Echo()
    out = list(map_shards(task, np.arange(5), 2, ExecutorSettings(shard_batches=1), device="cpu"))
    assert [(r.tolist(), int(p)) for r, p in out] == [([0, 1], 1), ([2, 3], 5), ([4], 4)]
    assert task.device == "cpu"


def test_cli_ray_flag_and_unreachable_cluster(tmp_path, colour_dataset, capsys):
    pytest.importorskip("ray")
    from lavise_core.cli import build_parser, main
    from lavise_core.cli.build import _settings

    args = build_parser().parse_args(["build", "--data", "x", "--ray"])
    assert (_settings(args).executor, _settings(args).address) == ("ray", None)
    args = build_parser().parse_args(
        ["probe", "--data", "x", "--ray", "ray://head:10001", "--ray-workers", "3"]
    )
    st = _settings(args)
    assert (st.executor, st.address, st.executor_settings().workers) == ("ray", "ray://head:10001", 3)
    assert _settings(build_parser().parse_args(["build", "--data", "x"])).executor == "local"
    rc = main(["probe", "--model", "synthbirds", "--data", str(colour_dataset.root), "--bundles",
               str(tmp_path / "b"), "--quiet", "--ray", "127.0.0.1:9"])  # fmt: skip
    assert rc == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in capsys.readouterr().err
    assert not list((tmp_path / "b").glob("*/probe/*"))  # nothing half-written
