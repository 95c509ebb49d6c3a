"""``lavise serve``: serve the dashboard to others, read-only unless ``--allow-build`` (issue 29).

``make demo`` serves on 127.0.0.1 only; this is the explicit step for a room. The mode reaches the app through
the ``LAVISE_SERVE`` environment variable, read in one place (:mod:`lavise_core.views.serving`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from lavise_core.views.serving import ENV_MODE, ENV_TOKEN, ENV_TOKEN_NEEDED, is_local_address

__all__ = [
    "add_demo",
    "add_serve",
    "cmd_demo",
    "cmd_serve",
    "demo_build_command",
    "demo_serve_command",
    "serve_command",
]

APP = Path(__file__).resolve().parents[2] / "app.py"


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the dashboard to others (read-only unless --allow-build)",
        description="Run the Streamlit dashboard for others to open. Read-only by default: no build form, no "
        "path inputs, exports only as downloads, messages without server paths. --allow-build shows the build "
        f"form; on a non-local --host it also needs a token in ${ENV_TOKEN}, which the form asks for.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface; default "
                   "127.0.0.1)")  # fmt: skip
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--allow-build", action="store_true",
                   help=f"let visitors build bundles (on a non-local host: only with the token in ${ENV_TOKEN})")  # fmt: skip
    p.add_argument("--bundles", default=None,
                   help="folder of the bundles to serve (default: $LAVISE_BUNDLES or data/bundles)")  # fmt: skip
    p.set_defaults(func=cmd_serve)


def serve_command(
    args: argparse.Namespace, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The Streamlit command line and environment for ``args`` (raises ValueError when they are unsafe)."""
    env = dict(os.environ if env is None else env)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number")
    local = is_local_address(args.host)
    if args.allow_build and not local and not env.get(ENV_TOKEN):
        raise ValueError(
            f"--allow-build on {args.host} (reachable from other machines) needs a token: set {ENV_TOKEN} in the "
            "environment; the build form asks visitors for it"
        )
    env[ENV_MODE] = "build" if args.allow_build else "read-only"
    env[ENV_TOKEN_NEEDED] = "1" if args.allow_build and not local else "0"
    if not args.allow_build:
        env.pop(ENV_TOKEN, None)  # nothing in the app needs it
    _offline_bundles(env, args.bundles or env.get("LAVISE_BUNDLES") or "data/bundles")
    argv = [
        *_streamlit(args.host, args.port),
        "--server.fileWatcherType",
        "none",
        "--client.showErrorDetails",
        "none",
    ]
    return argv, env


def _streamlit(host: str, port: int) -> list[str]:
    """``streamlit run app.py`` on ``host:port``, headless, no usage statistics."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]  # fmt: skip


def _offline_bundles(env: dict[str, str], bundles: str | os.PathLike) -> None:
    """The served bundles folder (absolute) and the offline switches, set in ``env``."""
    env["LAVISE_BUNDLES"] = str(Path(bundles).resolve())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_serve(args: argparse.Namespace) -> int:
    argv, env = serve_command(args)
    mode = "builds allowed" + (" with the token" if env[ENV_TOKEN_NEEDED] == "1" else "") if args.allow_build \
        else "read-only"  # fmt: skip
    print(f"serving {env['LAVISE_BUNDLES']} on http://{args.host}:{args.port} ({mode}); Ctrl-C stops it")
    sys.stdout.flush()
    os.chdir(APP.parent)
    os.execve(argv[0], argv, env)  # Streamlit replaces this process: signals reach the server itself


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="serve the dashboard as soon as the probe pass is done; the other stages build behind it",
        description="Build the probe stage (filter cards and top images), serve the dashboard on this machine "
        "only, and build the other stages in a second process meanwhile (lower priority). The Overview shows "
        "the progress; each page lights up when its stage is done. Ctrl-C stops both; running it again "
        "resumes the build where it stopped.",
    )
    p.add_argument("--model", default="synthbirds", help="model spec (default: synthbirds)")
    p.add_argument("--data", default="data/synthbirds", type=Path, help="probe data set folder")
    p.add_argument("--bundles", default=Path("data/bundles"), type=Path, help="where bundles live")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--stages", nargs="*", metavar="STAGE", default=None,
                   help="stages to build behind the dashboard (default: the default stages and attribution)")  # fmt: skip
    p.set_defaults(func=cmd_demo)


def demo_build_command(args: argparse.Namespace, stages: list[str], progress_file: Path) -> list[str]:
    """The ``lavise build`` command line that finishes the demo bundle behind the dashboard."""
    return [sys.executable, "-m", "lavise_core.cli", "build", "--model", args.model, "--data", str(args.data),
            "--bundles", str(args.bundles), "--stages", *stages, "--progress-file", str(progress_file),
            "--quiet"]  # fmt: skip


def demo_serve_command(
    args: argparse.Namespace, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The Streamlit command line and environment of ``lavise demo``: this machine only (127.0.0.1), local mode."""
    env = dict(os.environ if env is None else env)
    _offline_bundles(env, args.bundles)
    env.pop(ENV_MODE, None)  # this machine's own dashboard: not read-only
    return _streamlit("127.0.0.1", args.port), env


def cmd_demo(args: argparse.Namespace) -> int:
    import lavise_core
    from lavise_core.pipeline.background import PROGRESS_FILE
    from lavise_core.stages import REGISTRY

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number")
    stages = args.stages if args.stages is not None else [*REGISTRY.defaults(), "attribution"]
    for name in stages:
        REGISTRY[name]  # unknown names fail here, with the list of stages
    ex = lavise_core.build(args.model, args.data, stages=["probe"], bundles=args.bundles)
    root = ex.bundle.root
    todo = [s.name for s in REGISTRY.resolve(stages) if not ex.bundle.stage_done(s.name)]
    builder = None
    if todo:
        log = (root / "build.log").open("ab")
        builder = subprocess.Popen(
            demo_build_command(args, stages, root / PROGRESS_FILE), stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.nice(5), cwd=Path.cwd(),
        )  # fmt: skip
        log.close()
        print(f"building {len(todo)} stages in the background ({', '.join(todo)}); log: {root / 'build.log'}")
    argv, env = demo_serve_command(args)
    print(f"serving on http://localhost:{args.port} (this machine only); Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated demo stops its children too
    server = subprocess.Popen(argv, env=env, cwd=APP.parent)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for child in (server, builder):  # the next `lavise demo` resumes the build where it stopped
            if child is not None and child.poll() is None:
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
