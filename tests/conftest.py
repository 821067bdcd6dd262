"""Shared test settings: deterministic seeds, two threads (the CI machine's cores), offline wandb."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _shared_dir(sub: str):
    """``$EABENCH_DATA`` (or its sibling ``sub``, e.g. ``../weights``) as a Path.

    Real-data tests must not pass silently: without the variable they fail on CI (``CI`` set,
    as GitHub Actions and most runners do) and are skipped, with the reason, elsewhere.
    """
    from pathlib import Path

    root = os.environ.get("EABENCH_DATA")
    if not root:
        message = "EABENCH_DATA is not set (point it at the shared data folder, e.g. ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    path = Path(root) if sub == "data" else Path(root).parent / sub
    if not path.is_dir():
        pytest.fail(f"EABENCH_DATA={root}: {path} is not a folder")
    return path


@pytest.fixture(scope="session")
def eabench_data():
    """The real benchmark data folder ($EABENCH_DATA)."""
    return _shared_dir("data")


@pytest.fixture(scope="session")
def eabench_weights():
    """The real pretrained weights folder ($EABENCH_DATA/../weights)."""
    return _shared_dir("weights")


@pytest.fixture
def loopback_server():
    """serve(folder) -> base URL of an HTTP server on 127.0.0.1 for that folder, stopped after the test."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    servers = []

    def serve(folder) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
