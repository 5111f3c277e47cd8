"""`pip install pinfresh` is the client: no torch, Faust or pymilvus, and it reads vectors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store.api import create_app
from store.config import ApiSettings, MilvusSettings, RedisSettings
from tests.integration.conftest import served_over_http
from tests.integration.test_api import _seed

# one xdist process builds the client venv once
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("client_install")]
ROOT = Path(__file__).resolve().parents[2]
#: distributions only the operator extras may bring
HEAVY = {"torch", "torchvision", "faust-streaming", "aiokafka", "pymilvus", "open-clip-torch",
         "fastapi", "uvicorn", "redis", "timm", "transformers", "click", "aiohttp"}

READ = """
import json, sys
from store.client import PinfreshClient
with PinfreshClient(sys.argv[1], timeout=30) as c:
    emb = c.get_embeddings(["cat-2", "nope", "dog-3"])
print(json.dumps({"version": emb.version, "found": emb.found.tolist(),
                  "vectors": emb.vectors.tolist()}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("client")
    # what a source distribution holds, copied: no build/ or egg-info of the dev install
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("streams", "encoder", "store"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


async def test_client_installs_without_the_worker_and_reads_vectors(client_venv, stack,
                                                                    request):
    listed = subprocess.run([str(client_venv / "bin" / "pip"), "list", "--format", "json",
                             "--disable-pip-version-check"], capture_output=True, text=True,
                            check=True, timeout=120)
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "pinfresh" in installed and {"numpy", "httpx", "urllib3"} <= installed
    assert not installed & HEAVY, installed & HEAVY

    prefix = f"ci{abs(hash(request.node.name)) % 10**6}"
    truth = await _seed(stack.redis_url, stack.milvus_uri, prefix)
    app = create_app(ApiSettings(), RedisSettings(url=stack.redis_url, key_prefix=prefix),
                     MilvusSettings(uri=stack.milvus_uri, collection_prefix=prefix))
    async with served_over_http(app) as url:
        import asyncio

        read = await asyncio.to_thread(
            subprocess.run, [str(client_venv / "bin" / "python"), "-c", READ, url],
            capture_output=True, text=True, timeout=120, cwd="/")
    assert read.returncode == 0, read.stderr[-3000:]
    out = json.loads(read.stdout)
    assert out["version"] == "va" and out["found"] == [True, False, True]
    vecs = np.asarray(out["vectors"], dtype=np.float32)
    assert float(vecs[0] @ truth["va"]["cat-2"]) > 0.9999
    assert float(vecs[2] @ truth["va"]["dog-3"]) > 0.9999
    assert not vecs[1].any()


def test_the_command_names_the_extra_it_needs(client_venv):
    """The `pinfresh` script of a client-only install: one line naming the extra."""
    run = subprocess.run([str(client_venv / "bin" / "pinfresh"), "status"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 2, run.stderr[-2000:]
    assert "install pinfresh[server]" in run.stderr and "Traceback" not in run.stderr
