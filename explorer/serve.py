"""Start the explorer: command line, checkpoint sources, launch; and a helper that runs it in a subprocess.

`python app.py` (the Spaces entry point) calls `main`. Checkpoints come from `checkpoints/` (or
`--checkpoints DIR`) and from Hub repos named by `--hub-repo` or the env var `SAE_HUB_REPOS`
(comma-separated). The server listens on `PORT` / `GRADIO_SERVER_PORT` (default 7860) and
`GRADIO_SERVER_NAME` (default 0.0.0.0), as Spaces expects. Models go to the GPU when there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from explorer.cache import ModelCache, set_threads
from explorer.catalog import CheckpointCatalog, Source, fetch_hub_sources
from explorer.render import CSS
from explorer.state import Explorer
from explorer.ui import build_ui

log = logging.getLogger("sae-explorer")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINTS = ROOT / "checkpoints"
HUB_TIMEOUT_S = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env_port = os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or "7860"
    p = argparse.ArgumentParser(description="SAE explorer: a Gradio app to explore sparse-autoencoder latents on "
                                            "TinyStories language models and toy models.")
    p.add_argument("--checkpoints", action="append", default=None, metavar="DIR",
                   help="checkpoints root (repeatable; default: checkpoints/ beside app.py)")
    p.add_argument("--hub-repo", action="append", default=[], metavar="REPO_ID",
                   help="also load checkpoints from this Hugging Face Hub repo (repeatable; env SAE_HUB_REPOS adds "
                        "comma-separated ones)")
    p.add_argument("--base-model", action="append", default=[], metavar="NAME=SOURCE",
                   help="load SAEs whose model_name is NAME on SOURCE (a local HF folder, Hub id or random:<cfg>)")
    p.add_argument("--port", type=int, default=int(env_port), help="port (default: $PORT, $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                   help="interface to listen on (default: $GRADIO_SERVER_NAME or 0.0.0.0)")
    p.add_argument("--hub-timeout", type=float, default=HUB_TIMEOUT_S, help="seconds to wait for each Hub repo")
    p.add_argument("--concurrency", type=int, default=2, help="requests processed at once (default 2)")
    p.add_argument("--device", default=None, help="torch device for the models (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: CPU cores / concurrency, at least 1; oversubscribed threads "
                        "make every request slower)")
    return p.parse_args(argv)


def make_explorer(args: argparse.Namespace) -> Explorer:
    roots = [Path(r) for r in (args.checkpoints or [DEFAULT_CHECKPOINTS])]
    sources = [Source(r.resolve(), "local") for r in roots]
    notices = [f"Checkpoints folder {r} does not exist." for r in roots if not r.is_dir() and args.checkpoints]
    repos = [r.strip() for r in os.environ.get("SAE_HUB_REPOS", "").split(",") if r.strip()]
    repos += [r for r in args.hub_repo if r not in repos]
    if repos:
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        hub_sources, hub_notices = fetch_hub_sources(repos, timeout=args.hub_timeout)
        sources += hub_sources
        notices += hub_notices
    overrides = dict(s.split("=", 1) for s in args.base_model if "=" in s)
    return Explorer(CheckpointCatalog(sources, base_models=overrides), notices, ModelCache(device=args.device))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    threads = set_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, args.concurrency)))
    ex = make_explorer(args)
    for n in ex.notices:
        log.warning(n)
    log.info("%d LM checkpoints, %d toy folders, %d skipped; %d torch threads; device %s", len(ex.catalog.entries),
             len(ex.catalog.toy_folders), len(ex.catalog.failures), threads, ex.cache.device)
    ex.warm()
    demo = build_ui(ex)
    demo.queue(default_concurrency_limit=max(1, args.concurrency))
    demo.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=False,
                allowed_paths=[str(s.root) for s in ex.catalog.sources], footer_links=["api"])


class AppStartError(RuntimeError):
    """The app subprocess exited, or did not answer in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_subprocess(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0, log_path: Path | None = None
) -> Iterator[str]:
    """Run `python app.py ARGS` on a free local port; yield its URL once it answers, stop it afterwards.

    For the browser tests and the latency benchmark. The app's output goes to `log_path` (kept), or to a
    temporary file removed at the end. Raises AppStartError, with the end of the log, when the app exits
    or does not answer within `timeout` seconds.
    """
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "SAE_HUB_REPOS": "",
           "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", **(env or {})}
    keep_log = log_path is not None
    if log_path is None:
        fd, name = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *args, "--port", str(port),
                                 "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise AppStartError(f"app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).read(100)
                break
            except OSError as err:
                if time.time() > deadline:
                    raise AppStartError(
                        f"app did not start within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}"
                    ) from err
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not keep_log:
            log_path.unlink(missing_ok=True)
