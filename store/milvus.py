"""Milvus backend: the source of truth for vectors, one collection per model version.

Collection ``<prefix>_<version>`` holds one row per pin (primary key
``pin_id``), written only with ``upsert``. The alias ``<prefix>_live`` names
the live version's collection. pymilvus is synchronous; calls run in a
thread so the event loop keeps serving Kafka heartbeats.

Sealing. Milvus Lite (3.2.x) keeps upserted rows in a memtable until about
128 MB have gathered, and every search scans that memtable row by row in
Python: about 0.1 ms per unsealed row on the dev machine, so 5,000 fresh rows
make one search take half a second. With ``seal_rows`` set
(`MilvusSettings.seal_rows`), a store flushes (seals) a collection in the
background after every ``seal_rows`` rows it upserted into it. The default
is never: measured at 200,000 rows, sealing every 256 rows cut the write rate
from 2,493 to 1,030 rows/s and search stayed slow, because Milvus Lite's
search also walks every stored row in Python (its cross-segment dedup), so
its cost grows with the collection whatever is sealed. It pays for small
collections. A Milvus server seals by itself. The rows are durable before
any flush (Milvus Lite's WAL); a failed seal is logged and tried again after
the next ``seal_rows`` rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.exceptions import (
    ConnectError,
    ConnectionNotExistException,
    DataNotMatchException,
    DataTypeNotMatchException,
    MilvusUnavailableException,
    ParamError,
)

from encoder.errors import (
    DimensionMismatch,
    StateError,
    StoreRejected,
    StoreUnavailable,
    UnknownVersion,
)
from store.base import EmbeddingRecord, PinState, SearchHit
from store.config import TOPK_BOUND_PARAMS, MilvusSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Milvus error codes (``merr`` in Milvus 2.3+) that mean "not now": service not
#: ready or unavailable, memory/request/disk/rate limits, forced deny; collection or
#: partition not (fully) loaded; replica, channel, segment or node missing; storage
#: I/O failed. Internal (5) and undefined (65535) errors are not among them: the
#: server itself calls them not retriable, so the stream isolates the event that
#: caused them (a few tries, then ``internal_error``) instead of stalling on it.
OUTAGE_CODES = frozenset({1, 2, 3, 4, 7, 8, 9, 101, 103, 201, 202, 401, 501, 503, 601,
                          602, 901, 902, 903, 905, 1001})
#: Codes that blame the request's content: a parameter invalid or missing.
ROW_CODES = frozenset({1100, 1101})
COLLECTION_NOT_FOUND = 100

#: Milvus consistency levels the store reads with (``Bounded`` is a collection's default).
Consistency = Literal["Strong", "Session", "Bounded", "Eventually"]

#: Every stored field but the vector.
META_FIELDS = _META_FIELDS = [
    "pin_id", "model_version", "content_hash", "pin_version", "event_time", "encode_time",
    "image_location", "caption", "metadata",
]
_STATE_FIELDS = ["pin_id", "pin_version", "content_hash"]
#: VARCHAR sizes of a new collection, in UTF-8 bytes (what a Milvus server counts).
#: ``image_location`` is at most 4,096 bytes in a valid event and ``caption`` at
#: most 4,000 characters, so 16,384 bytes hold any caption whole.
MAX_LOCATION_BYTES = 4096
MAX_CAPTION_BYTES = 16384


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, at a character boundary."""
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


def connect(uri: str, *, token: str = "", timeout_s: float = 10.0,
            keepalive_s: float = 300.0) -> MilvusClient:
    """A MilvusClient on its own gRPC channel.

    pymilvus shares one channel per address between clients by default, so the
    first client's options win and the channel outlives ``close()``. Its default
    options ping every 10 s even when idle, which a Milvus server answers with
    GOAWAY "Too many pings" -- and the next client on that address then fails to
    connect. A dedicated channel with a slow keepalive that only pings during
    calls avoids both; ``close()`` really closes it.
    """
    return MilvusClient(
        uri=uri, token=token, timeout=timeout_s, dedicated=True,
        grpc_options={"grpc.keepalive_time_ms": int(keepalive_s * 1000),
                      "grpc.keepalive_permit_without_calls": False},
    )


#: The most hits one Milvus search returns (its topk limit).
MAX_TOPK = 16384


def _quote(pin_ids: Sequence[str]) -> str:
    # pin ids are validated against PIN_ID_PATTERN upstream; json-style quoting
    # keeps even an unvalidated id from breaking out of the string literal.
    return "[" + ",".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for p in pin_ids) + "]"


class MilvusStore:
    """`VectorBackend` over a Milvus server (standalone, cluster or Milvus Lite)."""

    def __init__(self, settings: MilvusSettings, *,
                 read_consistency: Consistency = "Session") -> None:
        self.settings = settings
        #: consistency of `get_many` and `get_states` unless a call names its own
        self.read_consistency: Consistency = read_consistency
        token = settings.token.get_secret_value() if settings.token else ""
        try:
            self._client = connect(settings.uri, token=token, timeout_s=settings.timeout_s,
                                   keepalive_s=settings.keepalive_s)
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise StoreUnavailable(
                f"cannot connect to Milvus at {settings.uri}: {exc} -- is it running? "
                "(`pinfresh up` starts what is down of the embedded stack)", retry_after=2.0,
            ) from exc
        self._loaded: set[str] = set()
        self._no_metadata: set[str] = set()
        self._text_bytes: dict[str, dict[str, int]] = {}  # VARCHAR sizes per collection
        self._schemas: dict[str, dict[str, Any]] = {}  # column upserts need the field list
        self._columns_ok = True
        self._unsealed: dict[str, int] = {}
        self._sealing: dict[str, asyncio.Task[None]] = {}
        self.seals = 0  # completed background seals, and their time (for benchmarks)
        self.seal_seconds = 0.0

    def collection(self, version: str) -> str:
        """Collection name of a model version."""
        return f"{self.settings.collection_prefix}_{version}"

    @property
    def live_alias(self) -> str:
        """Alias that names the live collection."""
        return f"{self.settings.collection_prefix}_live"

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a pymilvus call in a thread; map its errors by the server's code.

        * the network, a deadline, or a code of `OUTAGE_CODES` (not ready, rate
          limited, memory or disk quota, a collection released by a restart,
          a node or channel missing): `StoreUnavailable`, and every
          collection is loaded again before its next use;
        * a code of `ROW_CODES` (an invalid parameter: a string over its
          ``max_length`` in UTF-8 bytes, a wrong dimension) or pymilvus's own
          check of the data it was given: `StoreRejected`, the request's
          content is at fault and retrying cannot help;
        * collection not found: `UnknownVersion`;
        * a gRPC status in place of a code (pymilvus's retry loop ran out of
          time on one): `StoreUnavailable`;
        * any other code, or none: `StateError` (a bug or an operator's
          problem; the stream isolates the event that caused it).
        """
        # A deadline over the whole call: pymilvus retries inside one call (a frozen
        # server held a query for 69 s at a 10 s timeout) unless the call gets a
        # `timeout`, which bounds both its retry loop and each RPC. The thread then ends
        # by about twice the deadline, and the caller waits for it: an abandoned write
        # thread could otherwise land after a newer write of the same pin.
        slow = fn.__name__ in ("load_collection", "flush", "create_collection")
        deadline = self.settings.deadline_s * (5 if slow else 1)
        if getattr(fn, "__self__", None) is self._client:
            kwargs.setdefault("timeout", deadline)
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs),
                                          2 * deadline + 5)
        except TimeoutError as exc:
            self._forget_loaded()
            raise StoreUnavailable(f"Milvus {fn.__name__} did not answer in {deadline:g}s "
                                   f"({exc or 'no reply'})", retry_after=1.0) from exc
        except (grpc.RpcError, ConnectionError, MilvusUnavailableException,
                ConnectError, ConnectionNotExistException) as exc:
            self._forget_loaded()
            raise StoreUnavailable(f"Milvus {fn.__name__} failed: {exc}", retry_after=1.0) from exc
        except (ParamError, DataNotMatchException, DataTypeNotMatchException) as exc:
            raise StoreRejected(f"Milvus {fn.__name__} refused the data: {exc}") from exc
        except MilvusException as exc:
            if type(exc) is not MilvusException:
                # pymilvus's own checks (schema not ready, version incompatible, ...): their
                # code is pymilvus's default (1), not the server's
                raise StateError(f"Milvus {fn.__name__} failed: {exc}") from exc
            raw = getattr(exc, "code", None)
            if isinstance(raw, grpc.StatusCode):
                # pymilvus's retry loop gave up on a gRPC status that lasted until the
                # deadline (UNAVAILABLE, INTERNAL, UNKNOWN, CANCELLED, ...): the server
                # did not serve for that long, an outage (the statuses that blame the
                # request are raised at once, as a grpc.RpcError, and never get here)
                self._forget_loaded()
                raise StoreUnavailable(f"Milvus {fn.__name__} failed (gRPC {raw.name} until "
                                       f"the deadline): {exc.message}", retry_after=1.0) from exc
            code = raw if isinstance(raw, int) and not isinstance(raw, bool) else -1
            text = f"Milvus {fn.__name__} failed (code {raw!r}): {exc.message}"
            if code in OUTAGE_CODES:
                self._forget_loaded()
                raise StoreUnavailable(text, retry_after=1.0) from exc
            if code in ROW_CODES:
                raise StoreRejected(text) from exc
            if code == COLLECTION_NOT_FOUND:
                self._forget_loaded()
                raise UnknownVersion(f"{text}: see `pinfresh versions list`") from exc
            raise StateError(text) from exc

    def _forget_loaded(self) -> None:
        # a restarted server has its collections released: load them again before use
        self._loaded.clear()
        self._schemas.clear()

    # ---------------------------------------------------------------- schema
    async def ensure_version(self, version: str, dim: int) -> None:
        """Create (or check) the version's collection and load it."""
        name = self.collection(version)
        if await self._call(self._client.has_collection, name):
            desc = await self._call(self._client.describe_collection, name)
            have = next(
                (int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == "vector"), None
            )
            if have != dim:
                raise DimensionMismatch(
                    f"collection {name} has dim {have} != encoder dim {dim}: the model version "
                    "id names a different encoder; pick the matching model/checkpoint or drop "
                    "the collection (`pinfresh versions retire`)"
                )
        else:
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("pin_id", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("model_version", DataType.VARCHAR, max_length=128)
            schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
            schema.add_field("pin_version", DataType.INT64)
            schema.add_field("event_time", DataType.DOUBLE)
            schema.add_field("encode_time", DataType.DOUBLE)
            schema.add_field("image_location", DataType.VARCHAR,
                             max_length=MAX_LOCATION_BYTES)
            schema.add_field("caption", DataType.VARCHAR, max_length=MAX_CAPTION_BYTES)
            schema.add_field("metadata", DataType.JSON)
            index = self._client.prepare_index_params()
            # nested under "params": the form Milvus servers and Milvus Lite both read
            # (pymilvus flattens a plain dict, which Milvus Lite ignores)
            build = {"params": dict(self.settings.index_params)} if self.settings.index_params \
                else {}
            index.add_index(field_name="vector", index_type=self.settings.index_type,
                            metric_type=self.settings.metric, params=build)
            await self._call(
                self._client.create_collection, name, schema=schema, index_params=index
            )
            logger.info("created Milvus collection %s (dim %d)", name, dim)
        await self._load(name)

    async def _load(self, name: str) -> None:
        if name not in self._loaded:
            await self._call(self._client.load_collection, name)
            desc = await self._call(self._client.describe_collection, name)
            self._schemas[name] = desc  # what a column upsert sends with its rows
            if not any(f["name"] == "metadata" for f in desc["fields"]):
                # created before events' metadata was stored: keep working without it
                logger.warning("collection %s has no metadata field: pin metadata is not "
                               "stored in it (a new model version's collection has it)", name)
                self._no_metadata.add(name)
            # text is cut to the collection's own sizes: one created by an older
            # pinfresh holds captions of 4,096 bytes, not 16,384
            self._text_bytes[name] = {
                f["name"]: int(f["params"]["max_length"]) for f in desc["fields"]
                if f["name"] in ("image_location", "caption") and "max_length" in f.get(
                    "params", {})}
            self._loaded.add(name)

    def _fields(self, name: str, fields: list[str]) -> list[str]:
        return [f for f in fields if not (f == "metadata" and name in self._no_metadata)]

    async def ensure_loaded(self, version: str) -> bool:
        """Load a version's collection if it is not loaded; False if it does not exist.

        Writers call it before they claim pins: a load after an outage can take
        minutes (``deadline_s`` x 5), which is no time to hold other writers of
        those pins waiting.
        """
        name = self.collection(version)
        if name in self._loaded:
            return True
        if not await self.has_version(version):
            return False
        await self._load(name)
        return True

    async def has_version(self, version: str) -> bool:
        """Whether the version's collection exists."""
        return bool(await self._call(self._client.has_collection, self.collection(version)))

    async def drop_version(self, version: str) -> None:
        """Drop a version's collection (and any alias still naming it)."""
        name = self.collection(version)
        aliases = await self._call(self._client.list_aliases, collection_name=name)
        for alias in aliases.get("aliases", []):
            await self._call(self._client.drop_alias, alias)
        await self._call(self._client.drop_collection, name)
        self._loaded.discard(name)
        self._schemas.pop(name, None)
        self._unsealed.pop(name, None)

    async def set_live(self, version: str) -> None:
        """Point the live alias at a version's collection."""
        name = self.collection(version)
        existing = await self._call(self._client.list_aliases)
        if self.live_alias in existing.get("aliases", []):
            await self._call(self._client.alter_alias, name, self.live_alias)
        else:
            await self._call(self._client.create_alias, name, self.live_alias)

    # ----------------------------------------------------------------- writes
    async def upsert(self, version: str, records: Sequence[EmbeddingRecord]) -> None:
        """Upsert rows keyed by pin id.

        Sent column by column: pymilvus's row path spends about 0.15 ms of
        client CPU per 512-d row building the request, the column path about
        0.06 ms (measured on the dev machine, 64-row batches), and a feeder
        that writes thousands of pins a second feels that. The column call
        goes through the client's connection handler, the same one the row
        call uses; if a pymilvus release changes it, rows are sent instead.
        """
        if not records:
            return
        name = self.collection(version)
        await self._load(name)
        limits = self._text_bytes.get(name, {})
        cols: dict[str, tuple[Any, list[Any]]] = {
            "pin_id": (DataType.VARCHAR, [r.pin_id for r in records]),
            "vector": (DataType.FLOAT_VECTOR,
                       np.asarray([r.vector for r in records], dtype=np.float32).tolist()),
            "model_version": (DataType.VARCHAR, [r.model_version for r in records]),
            "content_hash": (DataType.VARCHAR, [r.content_hash for r in records]),
            "pin_version": (DataType.INT64, [int(r.pin_version) for r in records]),
            "event_time": (DataType.DOUBLE, [float(r.event_time) for r in records]),
            "encode_time": (DataType.DOUBLE, [float(r.encode_time) for r in records]),
            "image_location": (DataType.VARCHAR, [
                cut_utf8(r.image_location, limits.get("image_location", MAX_LOCATION_BYTES))
                for r in records]),
            "caption": (DataType.VARCHAR, [
                cut_utf8(r.caption, limits.get("caption", MAX_CAPTION_BYTES)) for r in records]),
        }
        if name not in self._no_metadata:
            cols["metadata"] = (DataType.JSON, [dict(r.metadata) for r in records])
        sent = False
        if self._columns_ok:
            try:
                entities = [{"name": k, "type": t, "values": v} for k, (t, v) in cols.items()]
                await self._call(self._upsert_columns, name, entities)
                sent = True
            except (AttributeError, TypeError) as exc:  # pymilvus changed: rows from now on
                logger.warning("column upsert unavailable (%r): sending rows", exc)
                self._columns_ok = False
        if not sent:
            rows = [{k: v[i] for k, (_, v) in cols.items()} for i in range(len(records))]
            await self._call(self._client.upsert, name, data=rows)
        await self._seal_after(name, len(records))

    async def _seal_after(self, name: str, rows: int) -> None:
        limit = self.settings.seal_rows
        if not limit:
            return
        n = self._unsealed.get(name, 0) + rows
        if n < limit or name in self._sealing:
            self._unsealed[name] = n  # a seal in flight takes these rows with it or the next does
            return
        self._unsealed[name] = 0
        task = asyncio.create_task(self._seal(name))
        self._sealing[name] = task
        task.add_done_callback(lambda _t: self._sealing.pop(name, None))

    async def settle(self, version: str, deadline_s: float = 600.0) -> bool:
        """Seal a version's collection now and wait until its index covers every row.

        For tools and benchmarks that want the steady state; the stream never
        waits for it. Returns False if rows were still unindexed at the deadline.
        """
        name = self.collection(version)
        await self._call(self._client.flush, name)
        self._unsealed[name] = 0
        t0 = time.monotonic()
        while True:
            info = await self._call(self._client.describe_index, name, "vector")
            if not int(info.get("pending_index_rows", 0)):
                return True
            if time.monotonic() - t0 > deadline_s:
                return False
            await asyncio.sleep(0.5)

    async def _seal(self, name: str) -> None:
        t = time.perf_counter()
        try:
            await asyncio.to_thread(self._client.flush, name)
        except Exception as exc:  # noqa: BLE001 - only a search speed-up: never fail a write
            logger.warning("sealing %s failed (%s); trying again after more rows", name, exc)
            return
        self.seals += 1
        self.seal_seconds += time.perf_counter() - t

    def _upsert_columns(self, name: str, entities: list[dict[str, Any]]) -> None:
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = self._client.describe_collection(name)
        handler = self._client._get_connection()  # noqa: SLF001 - see `upsert`
        handler.upsert(name, entities, timeout=self.settings.timeout_s, schema=schema)

    async def delete(self, version: str, pin_ids: Sequence[str]) -> None:
        """Delete pins by primary key."""
        if pin_ids and await self.has_version(version):
            await self._load(self.collection(version))
            await self._call(self._client.delete, self.collection(version), ids=list(pin_ids))

    # ------------------------------------------------------------------ reads
    async def get_many(self, version: str, pin_ids: Sequence[str], *,
                       consistency: Consistency | None = None) -> dict[str, EmbeddingRecord]:
        """Fetch full records by pin id (at ``consistency``, default `read_consistency`)."""
        if not pin_ids:
            return {}
        rows = await self._query(version, pin_ids, [*_META_FIELDS, "vector"], consistency)
        return {row["pin_id"]: _record(row) for row in rows}

    async def get_states(self, version: str, pin_ids: Sequence[str], *,
                         consistency: Consistency | None = None) -> dict[str, PinState]:
        """Fetch pin version and content hash by pin id (see `get_many`)."""
        if not pin_ids:
            return {}
        rows = await self._query(version, pin_ids, _STATE_FIELDS, consistency)
        return {
            r["pin_id"]: PinState(r["pin_id"], int(r["pin_version"]), str(r["content_hash"]))
            for r in rows
        }

    async def _query(
        self, version: str, pin_ids: Sequence[str], fields: list[str],
        consistency: Consistency | None = None,
    ) -> list[dict[str, Any]]:
        name = self.collection(version)
        if name not in self._loaded and not await self.has_version(version):
            raise UnknownVersion(f"no collection for version {version}: see `pinfresh versions`")
        await self._load(name)
        res = await self._call(
            self._client.query, name, filter=f"pin_id in {_quote(pin_ids)}",
            output_fields=self._fields(name, fields),
            consistency_level=consistency or self.read_consistency,
        )
        return list(res)

    async def search(
        self, version: str, vector: np.ndarray, k: int, exclude: Sequence[str] = ()
    ) -> list[SearchHit]:
        """Nearest pins to ``vector`` (best first), skipping ``exclude``.

        ``exclude`` is dropped from ``k + len(exclude)`` hits here, not sent as
        a ``pin_id not in [...]`` filter: on the Milvus 2.3.5 server a filtered
        HNSW search found fewer true neighbours (recall@10 0.91 against 0.98
        unfiltered, 200,000 rows, the index's default ``ef``) and evaluated
        the expression over every row. Fewer than ``k`` come back only when
        the collection holds fewer others, or when ``k + len(exclude)`` passes
        Milvus's topk limit (`MAX_TOPK`).
        """
        name = self.collection(version)
        await self._load(name)
        skip = set(exclude)
        limit = min(k + len(skip), MAX_TOPK)
        params = dict(self.settings.search_params)
        for key in TOPK_BOUND_PARAMS:  # the index refuses a value below the topk
            if key in params and int(params[key]) < limit:
                params[key] = limit
        res = await self._call(
            self._client.search, name, data=[np.asarray(vector, np.float32).tolist()],
            limit=limit, output_fields=["caption", "image_location"],
            search_params={"metric_type": self.settings.metric, "params": params},
        )
        hits = []
        for h in res[0]:
            # a Milvus server names the primary key "id" in hits, Milvus Lite by its field
            pin_id = str(h["id"] if "id" in h else h["pin_id"])
            if pin_id in skip:
                continue
            hits.append(SearchHit(
                pin_id=pin_id, score=float(h["distance"]),
                caption=str(h["entity"].get("caption", "")),
                image_location=str(h["entity"].get("image_location", ""))))
        return hits[:k]

    async def count(self, version: str) -> int:
        """Rows in a version's collection."""
        name = self.collection(version)
        await self._load(name)
        res = await self._call(self._client.query, name, filter="", output_fields=["count(*)"],
                               consistency_level="Strong")
        return int(res[0]["count(*)"])

    async def walk(self, version: str, fields: Sequence[str], page_size: int = 1000,
                   after: str = "") -> AsyncIterator[list[dict[str, Any]]]:
        """Every row of a version, ``page_size`` rows at a time in pin id order (one pass).

        Pages are queries ``pin_id > last LIMIT page_size``, all read at one
        timestamp taken when the walk starts, so the walk sees every write
        acknowledged before it began (the first page waits for the server to
        reach that time, the others do not wait). pymilvus's query iterator
        is not used: against a 2.3 server it cannot get that timestamp and
        reads its first page at the collection's Bounded consistency, which
        missed rows written a second earlier. The timestamp comes from this
        machine's clock: on another host than Milvus a clock ahead of the
        server's delays the first page, one behind it can miss the writes of
        that many milliseconds.
        """
        name = self.collection(version)
        await self._load(name)
        ts = int(time.time() * 1000) << 18  # a Milvus hybrid timestamp (physical ms, logical 0)
        out = self._fields(name, list(fields))
        last = after
        while True:
            flt = f"pin_id > {_quote([last])[1:-1]}" if last else ""
            page = await self._call(
                self._client.query, name, filter=flt, output_fields=out, limit=page_size,
                consistency_level="Customized", guarantee_timestamp=ts)
            if not page:
                return
            rows = list(page)
            yield rows
            last = max(str(r["pin_id"]) for r in rows)

    async def iter_pins(
        self, version: str, batch_size: int = 1000
    ) -> list[dict[str, Any]]:
        """All rows' metadata (no vectors) of a version, in memory (small versions, tests)."""
        return [row async for page in self.walk(version, _META_FIELDS, batch_size)
                for row in page]

    async def iter_records(self, version: str, batch_size: int = 1000
                           ) -> AsyncIterator[list[EmbeddingRecord]]:
        """Every record of a version, vectors included, one page at a time (see `walk`)."""
        async for page in self.walk(version, [*_META_FIELDS, "vector"], batch_size):
            yield [_record(row) for row in page]

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Milvus answers."""
        await self._call(self._client.list_collections)

    async def close(self) -> None:
        """Close the client, after any seal in flight has finished."""
        if self._sealing:
            await asyncio.gather(*self._sealing.values(), return_exceptions=True)
        await asyncio.to_thread(self._client.close)


def _record(row: dict[str, Any]) -> EmbeddingRecord:
    return EmbeddingRecord(
        pin_id=str(row["pin_id"]),
        vector=np.asarray(row["vector"], dtype=np.float32),
        model_version=str(row["model_version"]),
        content_hash=str(row["content_hash"]),
        pin_version=int(row["pin_version"]),
        event_time=float(row["event_time"]),
        encode_time=float(row["encode_time"]),
        image_location=str(row["image_location"]),
        caption=str(row["caption"]),
        metadata=dict(row.get("metadata") or {}),
    )
