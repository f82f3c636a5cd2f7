"""A server process imports the libraries of the services it hosts and no others (each of them costs tens of MB and
up to seconds at start)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services import cli
from services.core import registry
from services.core.settings import ROOT

# Heavy libraries and the one service that needs them.
OWNER = {
    "onnxruntime": "search",
    "tokenizers": "search",
    "qdrant_client": "search",
    "qdrant_edge": "search",
    "pypdf": "search",
    "spacy": "rag",
    "presidio_analyzer": "rag",
    "pocketsphinx": "voice",
    "envoy_data_plane": registry.CONTROL_PLANE.name,
}
SERVERS = {**cli.SERVERS, registry.CONTROL_PLANE.name: cli.CONTROL_PLANE_SERVER}


@pytest.mark.parametrize("service", SERVERS)
def test_a_server_process_imports_only_the_heavy_libraries_of_its_service(service: str) -> None:
    # What `voiceassist serve SERVICE` (or `control-plane`) imports before it builds the service.
    script = (
        f"import sys; from services import cli; cli.factories({{{service!r}: {SERVERS[service]!r}}}); "
        "print(' '.join(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    assert {name for name, owner in OWNER.items() if owner != service} & loaded == set()
