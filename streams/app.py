"""The Faust app: one agent that feeds micro-batches to `PinProcessor`.

The agent reads with ``noack_take`` and acks a batch's events only after
`PinProcessor.process` returned, i.e. after Milvus, Redis and the DLQ were
written; Faust then commits the acked offsets every
``kafka.commit_interval_s``. A worker killed at any point therefore re-reads
what it had not finished, and the processor's idempotence makes the replay
harmless. If the agent is cancelled mid-batch (shutdown), nothing of that
batch is acked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import faust

from encoder.engine import ImageEncoder
from store.errors import StoreUnavailable
from store.milvus import MilvusStore
from store.redis import RedisCache
from store.registry import VersionRegistry
from streams.events import DeadLetter
from streams.fetch import Fetcher
from streams.processor import Message, PinProcessor
from streams.refresh import RegistryVersions
from streams.settings import Settings

logger = logging.getLogger(__name__)


class KafkaDeadLetters:
    """`DeadLetterSink` writing JSON dead letters to the DLQ topic, keyed by pin id."""

    def __init__(self, app: faust.App, topic: str) -> None:
        self.app = app
        self.topic = topic

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Send and wait for the broker's ack of every letter."""
        for dl in letters:
            await self.app.producer.send_and_wait(
                self.topic, (dl.pin_id or "").encode() or None, dl.model_dump_json().encode(),
                partition=None, timestamp=None, headers=None,
            )


class DrainState:
    """Shared between the agent and the signal handler of `DrainingWorker`."""

    def __init__(self) -> None:
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()


class DrainingWorker(faust.Worker):
    """A Faust worker whose SIGTERM/SIGINT drains instead of Faust's own shutdown.

    Faust's shutdown suspends flow control, and the stream then acknowledges the
    buffered events it skips, so its final commit would cover events that were
    never written. This worker instead stops taking batches, lets the in-flight
    batch finish and acknowledge, commits exactly the acknowledged offsets and
    exits. Its partitions move to the other members once its session expires.
    """

    def __init__(self, app: faust.App, drain: DrainState, timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._drain = drain
        self._drain_timeout = timeout_s
        self._pinfresh_app = app

    def _on_sigterm(self) -> None:
        self._start_drain("SIGTERM")

    def _on_sigint(self) -> None:
        self._start_drain("SIGINT")

    def _start_drain(self, name: str) -> None:
        if self._drain.draining:
            return
        self._drain.draining = True
        asyncio.ensure_future(self._drain_and_exit(name))

    async def _drain_and_exit(self, name: str) -> None:
        logger.info("%s: draining (finishing the in-flight batch, then commit)", name)
        try:
            await asyncio.wait_for(self._drain.idle.wait(), self._drain_timeout)
        except TimeoutError:
            logger.warning("drain timed out after %.0fs: the in-flight batch will be "
                           "redelivered", self._drain_timeout)
        try:
            await self._pinfresh_app.consumer.commit()
            logger.info("committed acknowledged offsets; exiting")
        except Exception:
            logger.exception("final commit failed; uncommitted events will be redelivered")
        logging.shutdown()
        os._exit(0)


def create_app(settings: Settings, encoder: ImageEncoder,
               drain: DrainState | None = None) -> faust.App:
    """Build the Faust app with the encode agent bound to ``encoder``.

    The encoder is loaded before the app starts, so the worker joins the
    consumer group ready to encode.
    """
    drain = drain or DrainState()
    k = settings.kafka
    app_kwargs: dict[str, Any] = {}
    ssl_context = None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        ssl_context = create_ssl_context(cafile=k.ssl_cafile)
    if k.security_protocol.startswith("SASL"):
        app_kwargs["broker_credentials"] = faust.SASLCredentials(
            username=k.sasl_username or "",
            password=k.sasl_password.get_secret_value() if k.sasl_password else "",
            mechanism=k.sasl_mechanism, ssl_context=ssl_context,
        )
    elif ssl_context is not None:
        app_kwargs["broker_credentials"] = faust.SSLCredentials(ssl_context)
    app = faust.App(
        k.group_id,
        broker=[f"kafka://{h.strip()}" for h in k.bootstrap_servers.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        topic_allow_declare=True,
        broker_rebalance_timeout=k.rebalance_timeout_s,
        broker_session_timeout=k.session_timeout_s,
        broker_heartbeat_interval=k.heartbeat_interval_s,
        broker_commit_interval=k.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        store="memory://",
        web_enabled=False,
        **app_kwargs,
    )
    topic = app.topic(k.topic, key_type=bytes, value_type=bytes, partitions=k.partitions)
    app.topic(k.dlq_topic, key_type=bytes, value_type=bytes, partitions=k.partitions)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    w = settings.worker

    @app.agent(topic, name="encode_pins")
    async def encode_pins(stream: Any) -> None:
        milvus = MilvusStore(settings.milvus)
        cache = RedisCache(settings.redis)
        fetcher = Fetcher(settings.fetch)
        registry = VersionRegistry(milvus, cache)
        info = encoder.info
        while True:  # a store that is down at start-up delays the worker, never kills it
            try:
                await registry.register(info.version, info.dim, info.model, info.checkpoint,
                                        settings.encoder.seed)
                break
            except StoreUnavailable as exc:
                logger.warning("stores unavailable at start-up (%s); retrying in 2s", exc)
                await asyncio.sleep(2)
        processor = PinProcessor(
            encoder=encoder, milvus=milvus, cache=cache, fetcher=fetcher,
            dlq=KafkaDeadLetters(app, k.dlq_topic), settings=w, worker_name=worker_name,
            versions=RegistryVersions(registry, encoder, settings.encoder),
        )
        await processor.start()
        try:
            async for events in stream.noack_take(w.batch_size, within=w.batch_wait_s):
                if drain.draining:  # taken after SIGTERM: leave unacked for the next owner
                    await asyncio.Event().wait()
                drain.idle.clear()
                try:
                    msgs = [Message(e.message.key, e.message.value) for e in events]
                    await _process_until_done(processor, msgs, w.retry_backoff_max_s)
                    for e in events:
                        await stream.ack(e)
                finally:
                    drain.idle.set()
        finally:
            await fetcher.close()
            await cache.close()
            await milvus.close()

    return app


async def _process_until_done(
    processor: PinProcessor, msgs: list[Message], max_backoff: float
) -> None:
    """Call `PinProcessor.process` until it returns; an unexpected error pauses, never drops."""
    delay = 0.5
    while True:
        try:
            await processor.process(msgs)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("batch of %d failed unexpectedly; retrying in %.1fs (not acked)",
                             len(msgs), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff)


def run_worker(settings: Settings) -> None:
    """Load the encoder, then run the Faust worker until SIGTERM/SIGINT.

    Called by ``pinfresh worker``; blocks.
    """
    from streams.metrics import ENCODER_BATCH, ENCODER_BATCH_WAIT, serve_metrics

    encoder = ImageEncoder.load(settings.encoder)

    def on_batch(size: int, wait_s: float) -> None:
        ENCODER_BATCH.observe(size)
        ENCODER_BATCH_WAIT.observe(wait_s)

    encoder.on_batch = on_batch
    serve_metrics(settings.worker.metrics_host, settings.worker.metrics_port)
    drain = DrainState()
    app = create_app(settings, encoder, drain)
    worker = DrainingWorker(app, drain, settings.worker.drain_timeout_s,
                            loglevel=settings.log_level.lower(), quiet=True,
                            redirect_stdouts=False, override_logging=False)
    worker.execute_from_commandline()
