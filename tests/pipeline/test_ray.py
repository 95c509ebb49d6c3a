"""The probe pass and the LaViSE region features on a local 2-worker Ray cluster equal the single-process ones.

One Ray runtime for the module (``ray.init(num_cpus=2)``), shut down at the end; the demo CNN on 48 generated
SynthBirds images (one of them corrupt). Marked ``ray``: ``make test`` runs them (Ray is a test dependency);
if Ray is missing or cannot start here they skip with the reason instead of failing or hanging.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from lavise_core.data.dataset import ProbeDataset
from lavise_core.pipeline.executor import ExecutorError, ExecutorSettings
from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe, run_probe_sharded

pytestmark = pytest.mark.ray

SETTINGS = ProbeSettings(top_k=6, batch_size=8, num_workers=0, progress=False)
RAY2 = ExecutorSettings(kind="ray", workers=2, shard_batches=1)  # 6 shards of 8 images


@pytest.fixture(scope="module")
def ray_runtime():
    """Ray in this (main) thread: its daemons die with the thread that started them. SIGALRM bounds the start."""
    ray = pytest.importorskip("ray")

    def too_long(signum, frame):
        raise TimeoutError("ray.init took more than 120 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # any start failure is a skip reason, not a failure
        ray.shutdown()
        pytest.skip(f"Ray could not start here: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    """48 SynthBirds images (image 5 corrupt), the demo CNN, and the single-process probe bundle."""
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.models.networks import load_model

    tmp = tmp_path_factory.mktemp("raybirds")
    ds = generate_synthbirds(tmp / "birds", n=48, seed=0, image_size=64, progress=False)
    (ds.root / ds.records[5].path).write_bytes(b"not an image")
    ds = ProbeDataset.open(ds.root)
    lm = load_model("synthbirds")
    single = run_probe(open_or_create_bundle(tmp / "single", lm, ds), lm, ds, SETTINGS)
    return tmp, ds, lm, single


def _actor_pids() -> list[int]:
    """Process ids of this session's Ray shard actors (their command line names the actor class)."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"_RayShardActor" in cmd:
                pids.append(int(p))
    return sorted(pids)


def _assert_same_probe(a, b) -> None:
    for name in ("top_index", "threshold", "quantiles", "valid"):
        assert np.array_equal(a.array(f"probe/{name}"), b.array(f"probe/{name}")), name
    for name in ("pooled", "logits", "top_value"):
        assert np.abs(np.asarray(a.array(f"probe/{name}")) - b.array(f"probe/{name}")).max() <= 1e-6, name
    assert a.read_json("probe/failures") == b.read_json("probe/failures") != {}
    assert np.abs(np.asarray(a.array("probe/top_maps"), np.float32) - b.array("probe/top_maps")).max() <= 1e-3


def test_registry_stage_on_ray_equals_single_process(ray_runtime, birds):
    from lavise_core.pipeline.stages import BuildSettings, build_stages
    from lavise_core.stages import REGISTRY

    tmp, ds, lm, single = birds
    bundle = open_or_create_bundle(tmp / "ray", lm, ds)
    settings = BuildSettings(batch_size=8, top_k=6, executor="ray", ray_workers=2)
    assert build_stages(bundle, ds, REGISTRY, ["probe"], settings=settings, model_loader=lambda: lm) == {
        "probe": "built"
    }
    _assert_same_probe(single, bundle)
    info = bundle.manifest["stages"]["probe"]
    assert info["executor"] == "ray" and info["skipped"] == 1
    assert not (bundle.root / "probe/_partial").exists()


def test_killed_worker_is_retried_and_result_equal(ray_runtime, birds):
    tmp, ds, lm, single = birds
    bundle = open_or_create_bundle(tmp / "killed", lm, ds)
    killed: list[int] = []

    def kill_one(done: int, total: int) -> None:
        if not killed and done < total:
            pid = _actor_pids()[0]
            os.kill(pid, signal.SIGKILL)  # an actor of the pool this test started
            killed.append(pid)

    run_probe_sharded(bundle, lm, ds, SETTINGS, RAY2, on_progress=kill_one)
    assert killed and killed[0] not in _actor_pids()
    _assert_same_probe(single, bundle)


def test_worker_dead_for_good_writes_no_arrays(ray_runtime, birds):
    """A timer kills every shard actor every 0.5 s from the start (no restarts allowed): the actors take longer
    than that to load the model, so no shard comes back and the pass fails with a message naming the death."""
    import threading
    import time

    tmp, ds, lm, _ = birds
    bundle = open_or_create_bundle(tmp / "dead", lm, ds)
    stop = threading.Event()

    def kill_all() -> None:
        while not stop.wait(0.5):
            for pid in _actor_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_all, daemon=True)
    t0 = time.perf_counter()
    killer.start()
    try:
        with pytest.raises(ExecutorError, match="died"):
            run_probe_sharded(bundle, lm, ds, SETTINGS, ExecutorSettings("ray", None, 2, 1, max_restarts=0))
    finally:
        stop.set()
        killer.join()
    assert time.perf_counter() - t0 < 120
    assert not bundle.stage_done("probe")
    assert not any(p.suffix == ".npy" for p in (bundle.root / "probe").glob("*"))  # no arrays written


@pytest.mark.parametrize("stop", [KeyboardInterrupt, ExecutorError])
def test_interrupted_pass_keeps_what_came_back_and_the_rerun_resumes(ray_runtime, birds, stop):
    """The pass stops after the second shard came back (between checkpoints): Ctrl-C, or an executor error
    such as a worker dead for good. It writes no arrays but checkpoints those 16 rows (and says so); the next
    pass maps only the other 32 and equals the single-process pass exactly."""
    from lavise_core.pipeline.probe import SHARDED_STATE

    tmp, ds, lm, single = birds
    bundle = open_or_create_bundle(tmp / f"interrupted-{stop.__name__}", lm, ds)

    def interrupt(done: int, total: int) -> None:
        if done == 16:
            raise stop("a Ray worker died")

    with pytest.raises(stop) as err:
        run_probe_sharded(bundle, lm, ds, SETTINGS, RAY2, on_progress=interrupt)
    if stop is ExecutorError:
        assert "The 16 of 48 images that came back are kept: the same build maps only the rest." in str(
            err.value
        )
    assert not bundle.stage_done("probe")
    assert sorted(p.name for p in (bundle.root / "probe").iterdir()) == ["_partial"]
    kept = np.load(bundle.root / "probe" / "_partial" / SHARDED_STATE)["finished"]
    assert kept.sum() == 16

    seen: list[int] = []
    run_probe_sharded(bundle, lm, ds, SETTINGS, RAY2, on_progress=lambda done, total: seen.append(done))
    assert seen == [24, 32, 40, 48]  # four shards of 8 on top of the 16 kept
    assert bundle.manifest["stages"]["probe"]["resumed_rows"] == 16
    _assert_same_probe(single, bundle)
    assert not (bundle.root / "probe/_partial").exists()


def test_workers_that_cannot_read_the_images(ray_runtime, birds):
    tmp, _, lm, _ = birds
    root = tmp / "moved"
    shutil.copytree(tmp / "birds", root)
    ds = ProbeDataset.open(root)
    bundle = open_or_create_bundle(tmp / "moved-bundles", lm, ds)
    shutil.rmtree(root)  # the driver has the manifest; the workers find no images
    with pytest.raises(ExecutorError, match="cannot see the data set folder"):
        run_probe_sharded(bundle, lm, ds, SETTINGS, RAY2)
    assert not bundle.stage_done("probe") and not (bundle.root / "probe/_partial").exists()


def test_region_features_on_ray_equal_local(ray_runtime, birds):
    from lavise_core.explain.lavise.head import extract_region_features

    _, ds, lm, _ = birds
    torch.set_num_threads(1)
    local = extract_region_features(lm, ds, lm.default_layer, "train", batch_size=8)
    dist = extract_region_features(lm, ds, lm.default_layer, "train", batch_size=8, executor=RAY2)
    assert np.array_equal(local.image, dist.image) and local.region == dist.region
    assert local.concepts == dist.concepts
    assert np.abs(local.features - dist.features).max() <= 1e-6
    assert np.array_equal(local.background_image, dist.background_image)
    assert np.abs(local.background - dist.background).max() <= 1e-5


def test_region_features_interrupted_on_ray_keep_their_shards_and_resume(ray_runtime, birds, tmp_path):
    """The region pass stops after its first shard: that shard stays in ``resume_dir``; the next pass reads it
    back, maps only the other images, equals the single-process pass and removes the folder."""
    from lavise_core.explain.lavise.head import extract_region_features

    _, ds, lm, _ = birds
    torch.set_num_threads(1)
    local = extract_region_features(lm, ds, lm.default_layer, "train", batch_size=8)
    keep = tmp_path / "regions_partial"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_region_features(
            lm, ds, lm.default_layer, "train", batch_size=8, executor=RAY2, resume_dir=keep, on_progress=stop
        )
    assert len(list(keep.glob("shards-*/shard_*.npz"))) == 1
    seen: list[tuple[int, int]] = []
    dist = extract_region_features(
        lm, ds, lm.default_layer, "train", batch_size=8, executor=RAY2, resume_dir=keep,
        on_progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    total = seen[-1][1]
    assert seen[0] == (8, total) and seen[-1] == (total, total) and len(seen) == 1 + (total - 8 + 7) // 8
    assert np.array_equal(local.image, dist.image) and local.region == dist.region
    assert local.concepts == dist.concepts
    assert np.abs(local.features - dist.features).max() <= 1e-6
    assert np.array_equal(local.background_image, dist.background_image)
    assert np.abs(local.background - dist.background).max() <= 1e-5
    assert not keep.exists()


def test_unreachable_address_fails_fast():
    pytest.importorskip("ray")
    import time

    t0 = time.perf_counter()
    with pytest.raises(ExecutorError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:9"):
        next(iter(_map(ExecutorSettings(kind="ray", address="127.0.0.1:9"))))
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ExecutorError, match="not host:port"):
        next(iter(_map(ExecutorSettings(kind="ray", address="nonsense"))))
    with pytest.raises(ExecutorError, match="unknown executor"):
        ExecutorSettings(kind="spark")


def _map(settings: ExecutorSettings):
    from lavise_core.pipeline.executor import map_shards

    class Nothing:
        def setup(self, device):
            pass

        def __call__(self, rows):
            return rows

    return map_shards(Nothing(), np.arange(4), 2, settings)
