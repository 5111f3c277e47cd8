"""``pinfresh``: one console script, one subcommand per process or task.

A thin dispatcher: each module here is one command group and calls library
functions (the streaming core, the store, the encoder, `streams.runtime`);
`streams.cli.base` holds the root group, the settings context and the only
logging set-up. ``python -m streams.cli`` runs it too.
"""

from __future__ import annotations

import sys

from encoder.errors import PinfreshError
from streams.cli import bench, models, ops, read, stack, stream, versions  # noqa: F401 - commands
from streams.cli.base import cli, err_console

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point; turns PinfreshError into a one-line message on stderr."""
    try:
        cli(standalone_mode=True)
    except PinfreshError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
