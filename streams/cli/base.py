"""The root command group, the settings context every command gets, logging set-up.

Every setting comes from the settings object (`streams.settings.Settings`):
environment variables ``PINFRESH_<SECTION>__<NAME>`` or a ``.env`` file; the
options of the commands override the few that are handy on the command line
and name their variable in ``--help``. This module is the only place that
configures logging.
"""

from __future__ import annotations

import logging
import sys

import click
from rich.console import Console

from streams.runtime.processes import load_settings
from streams.settings import Settings

console = Console(stderr=False)
err_console = Console(stderr=True)
logger = logging.getLogger("pinfresh")


def _configure_logging(settings: Settings) -> None:
    from streams.runtime.logconf import configure_logging

    configure_logging(settings.log_level, settings.log_json)


class Ctx:
    """What every command gets: the settings, built once, with logging configured."""

    def __init__(self) -> None:
        from streams.runtime.processes import settings_warnings
        from streams.settings import SettingsError

        try:
            self.settings = load_settings()
        except SettingsError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        _configure_logging(self.settings)
        for line in settings_warnings():
            logger.warning("%s", line)


pass_ctx = click.make_pass_decorator(Ctx, ensure=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pinfresh")
    except PackageNotFoundError:
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="pinfresh",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Keep image embeddings fresh: Kafka -> Faust -> open_clip -> Milvus + Redis."""


