"""Builds against each other and against the file system: real processes, a real OS file lock, a real
write-size limit (RLIMIT_FSIZE, the kernel refuses the write as on a full disk) and a read-only folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from lavise_core import cli
from lavise_core.pipeline.bundle import Bundle, BundleBusy
from lavise_core.pipeline.stages import Stage, StageRegistry, build_stages

ROOT = Path(__file__).resolve().parents[2]

# a child process: one slow stage "a" that writes an 8 MB array, then ``b``; argv: bundle, timeout, limit
CHILD = r"""
import json, os, resource, signal, sys, time
import numpy as np
from lavise_core.pipeline.bundle import Bundle, BundleError
from lavise_core.pipeline.stages import Stage, StageRegistry, build_stages

root, timeout, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
if limit:  # the kernel refuses writes past `limit` bytes (EFBIG), as a full disk refuses them (ENOSPC)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

def a(ctx):
    time.sleep(float(os.environ.get("STAGE_SECONDS", "0")))
    release, t0 = os.environ.get("RELEASE"), time.time()
    while release and not os.path.exists(release) and time.time() - t0 < 120:  # held until the test says
        time.sleep(0.05)
    ctx.bundle.write_array("a/out", np.arange(1 << 20, dtype=np.float64))
    return {"pid": os.getpid()}

def b(ctx):
    ctx.bundle.write_json("b/out", {"sum": float(ctx.bundle.array("a/out").sum())})

reg = StageRegistry([Stage("a", (), 1, a), Stage("b", ("a",), 1, b)])
bundle = Bundle.open(root, writable=True)
try:
    out = build_stages(bundle, None, reg, lock_timeout=None if timeout == "wait" else float(timeout))
except BundleError as e:
    print("ERROR", e, flush=True)
    sys.exit(2)
print("OUTCOME", json.dumps(out), flush=True)
"""


def _child(
    root: Path, timeout: str = "wait", limit: int = 0, seconds: float = 0.0, prefix: tuple = (),
    release: Path | None = None,
) -> subprocess.Popen:  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STAGE_SECONDS": str(seconds),
        "RELEASE": str(release or ""),
    }
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", CHILD, str(root), timeout, str(limit)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture
def bundle(tmp_path) -> Bundle:
    return Bundle.create(tmp_path / "b", {"key": "k", "layer": "x", "classes": []})


def _wait_for(path: Path, seconds: float = 20.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < seconds, f"{path} never appeared"
        time.sleep(0.05)


def test_two_builds_of_one_bundle_wait_or_refuse_never_interleave(bundle, tmp_path) -> None:
    release = tmp_path / "release"  # the first build stays inside stage "a" until this file exists
    first = _child(bundle.root, release=release)
    _wait_for(bundle.root / ".build.owner")  # the first one holds the lock and is inside stage "a"
    refused = _child(bundle.root, timeout="0")
    out_refused = refused.communicate(timeout=60)[0]
    assert refused.returncode == 2, out_refused
    assert f"is being built by process {first.pid} on" in out_refused and "--no-wait" in out_refused
    waiting = _child(bundle.root)
    said = waiting.stdout.readline()  # it says it waits, then waits: only now may the first build go on
    release.touch()
    out_first, out_waiting = first.communicate(timeout=60)[0], said + waiting.communicate(timeout=60)[0]
    assert first.returncode == 0 and waiting.returncode == 0, (out_first, out_waiting)
    assert json.loads(out_first.split("OUTCOME", 1)[1]) == {"a": "built", "b": "built"}
    # the waiting build re-read the manifest after the first finished: nothing was built twice
    assert "being built by process" in out_waiting
    assert json.loads(out_waiting.split("OUTCOME", 1)[1]) == {"a": "skipped", "b": "skipped"}
    done = Bundle.open(bundle.root)
    assert done.manifest["stages"]["a"]["pid"] == first.pid
    assert done.read_json("b/out") == {"sum": float(np.arange(1 << 20).sum())}
    assert not (bundle.root / ".build.owner").exists()


def test_cli_no_wait_refuses_while_a_build_holds_the_lock(tmp_path, colour_dataset, capsys) -> None:
    args = ["build", "--model", "synthbirds", "--data", str(colour_dataset.root), "--bundles", str(tmp_path)]
    assert cli.main([*args, "--stages", "probe", "--quiet"]) == 0
    root = Path(capsys.readouterr().out.split("bundle: ")[1].split()[0])
    with Bundle.open(root, writable=True).build_lock():
        assert cli.main([*args, "--stages", "probe", "--force", "probe", "--quiet", "--no-wait"]) == 2
    err = capsys.readouterr().err
    assert f"is being built by process {os.getpid()}" in err and "Traceback" not in err
    assert Bundle.open(root).stage_done("probe")  # untouched by the refused build


def test_full_disk_during_a_build_says_so_and_resumes(bundle) -> None:
    # 8 MB array, writes capped at 1 MB: stage "a" fails the way it would on a full disk
    proc = _child(bundle.root, limit=1 << 20)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, out
    assert "the disk is full while building stage 'a'" in out and "run the same build again" in out
    left = sorted(p.name for p in bundle.root.rglob("*") if p.is_file())
    assert left == [".build.lock", "bundle.json"]  # no half-written array, temporary file or owner file
    assert Bundle.open(bundle.root).manifest["stages"] == {}
    proc = _child(bundle.root)  # space is back: the same build finishes
    out = proc.communicate(timeout=60)[0]
    assert json.loads(out.split("OUTCOME", 1)[1]) == {"a": "built", "b": "built"}


def _without_root_powers() -> tuple:
    """A command prefix that makes root obey file permissions (drops CAP_DAC_OVERRIDE); none for others."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all")


def test_read_only_bundle_folder_reads_but_refuses_to_build_with_a_message() -> None:
    top = Path(tempfile.mkdtemp(prefix="lavise-ro-"))  # not tmp_path: cleaned up after the chmod below
    try:
        b = Bundle.create(top / "b", {"key": "k", "layer": "x", "classes": []})
        reg = StageRegistry([Stage("a", (), 1, lambda ctx: ctx.bundle.write_json("a/out", {"v": 1}))])
        build_stages(b, None, reg)
        for p in [b.root, *b.root.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        proc = _child(b.root, prefix=_without_root_powers())  # stage "b" is still to build; "a" is recorded
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2, out
        assert f"cannot write to {b.root}" in out and "read-only for you" in out, out
        assert "Traceback" not in out
        assert Bundle.open(b.root).read_json("a/out") == {"v": 1}  # what is built stays readable
    finally:
        for p in [top, *top.rglob("*")]:
            p.chmod(0o755)
        shutil.rmtree(top)


def test_busy_bundle_in_process_raises_bundle_busy(bundle) -> None:
    reg = StageRegistry([Stage("a", (), 1, lambda ctx: None)])
    with Bundle.open(bundle.root, writable=True).build_lock():
        with pytest.raises(BundleBusy, match="is being built by process"):
            build_stages(bundle, None, reg, lock_timeout=0)
        with pytest.raises(BundleBusy, match=r"still being built .* after 0 s"):
            build_stages(bundle, None, reg, lock_timeout=0.2)
    assert build_stages(bundle, None, reg) == {"a": "built"}
