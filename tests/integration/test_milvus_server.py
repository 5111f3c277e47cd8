"""What a Milvus server does that Milvus Lite did not, and how the store copes.

Each test names a behaviour that Milvus Lite 3.2.2 hid (it is lenient about
sizes, reads everything at once, and has no time ticks): checked here on the
embedded `milvus` 2.3.5 server the stack runs by default.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from pymilvus import DataType

from store.base import EmbeddingRecord
from store.config import MilvusSettings
from store.milvus import MilvusStore, cut_utf8

pytestmark = pytest.mark.integration


def rec(pin: str, version: int = 1, caption: str = "", dim: int = 8) -> EmbeddingRecord:
    v = np.random.default_rng(abs(hash(pin)) % 2**32).standard_normal(dim).astype(np.float32)
    return EmbeddingRecord(pin, v / np.linalg.norm(v), "v1", "h" * 64, version, time.time(),
                           time.time(), f"/img/{pin}.png", caption or f"caption {pin}")


@pytest.fixture
async def milvus(stack, request):
    tag = f"ms{abs(hash(request.node.name)) % 10**8}"
    store = MilvusStore(MilvusSettings(uri=stack.milvus_uri, collection_prefix=tag))
    yield store
    await store.close()


def test_cut_utf8_keeps_whole_characters():
    assert cut_utf8("abc", 10) == "abc"
    assert cut_utf8("日本語", 7) == "日本"  # 9 bytes; the third character does not fit
    assert cut_utf8("日本語", 9) == "日本語"
    assert len(cut_utf8("é" * 3000, 4096).encode()) <= 4096


async def test_an_older_collection_gets_text_cut_to_its_own_byte_sizes(milvus):
    """A collection made by an older pinfresh holds captions of 4,096 bytes: a 12,000-byte
    caption is cut at a character boundary to fit, instead of refused (code 1100) and
    retried for hours."""
    client = milvus._client
    name = milvus.collection("v1")
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pin_id", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    for f in ("model_version", "content_hash"):
        schema.add_field(f, DataType.VARCHAR, max_length=128)
    schema.add_field("pin_version", DataType.INT64)
    schema.add_field("event_time", DataType.DOUBLE)
    schema.add_field("encode_time", DataType.DOUBLE)
    schema.add_field("image_location", DataType.VARCHAR, max_length=4096)
    schema.add_field("caption", DataType.VARCHAR, max_length=4096)
    schema.add_field("metadata", DataType.JSON)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)
    caption = "日本語" * 1334  # 4,002 characters, 12,006 bytes
    await milvus.ensure_version("v1", 8)
    await milvus.upsert("v1", [rec("jp", caption=caption)])
    got = (await milvus.get_many("v1", ["jp"], consistency="Strong"))["jp"]
    assert len(got.caption.encode()) <= 4096 and caption.startswith(got.caption)
    assert len(got.caption) == 4096 // 3


async def test_session_reads_see_this_process_upserts_and_walks_see_everything(milvus):
    """Reads default to Bounded on a server (a fresh upsert is invisible for a while).
    The store reads at Session (its own writes) and walks at one timestamp taken when
    the walk starts (everything acknowledged before)."""
    await milvus.ensure_version("v1", 8)
    await milvus.upsert("v1", [rec(f"p{i}") for i in range(300)])
    assert len(await milvus.get_states("v1", [f"p{i}" for i in range(300)])) == 300
    walked = [r["pin_id"] async for page in milvus.walk("v1", ["pin_id"], page_size=64)
              for r in page]
    assert sorted(walked) == sorted(f"p{i}" for i in range(300))
    assert walked == sorted(walked)  # pages come in pin id order, one pass
    assert await milvus.count("v1") == 300


async def test_the_index_covers_a_growing_collection_after_settle(milvus):
    await milvus.ensure_version("v1", 8)
    for i in range(0, 3000, 500):
        await milvus.upsert("v1", [rec(f"g{j}") for j in range(i, i + 500)])
    assert await milvus.settle("v1", deadline_s=600)
    info = milvus._client.describe_index(milvus.collection("v1"), "vector")
    assert int(info.get("pending_index_rows", 0)) == 0 and int(info["indexed_rows"]) >= 3000
    hits = await milvus.search("v1", rec("g42").vector, 5)
    assert hits[0].pin_id == "g42"


async def test_the_live_alias_follows_cutover(milvus):
    for v in ("v1", "v2"):
        await milvus.ensure_version(v, 8)
    await milvus.upsert("v1", [rec("only-in-v1")])
    await milvus.upsert("v2", [rec("only-in-v2")])
    client = milvus._client
    for live, pin in (("v1", "only-in-v1"), ("v2", "only-in-v2"), ("v1", "only-in-v1")):
        await milvus.set_live(live)
        rows = client.query(milvus.live_alias, filter='pin_id != ""', output_fields=["pin_id"],
                            consistency_level="Strong")
        assert [r["pin_id"] for r in rows] == [pin]


async def test_a_released_collection_is_loaded_again_on_next_use(milvus):
    """A restarted server has its collections released: a read fails with code 101
    (an outage, retried) and the store loads the collection before the next one."""
    from encoder.errors import StoreUnavailable

    await milvus.ensure_version("v1", 8)
    await milvus.upsert("v1", [rec("a")])
    milvus._client.release_collection(milvus.collection("v1"))
    with pytest.raises(StoreUnavailable, match="code 101"):
        await milvus.get_states("v1", ["a"])
    assert "a" in await milvus.get_states("v1", ["a"], consistency="Strong")


async def test_search_leaves_out_excluded_pins_and_still_returns_k(milvus):
    """`similar` excludes the query's own pin from k + len(exclude) hits (no filter
    expression: a filtered HNSW search found fewer true neighbours on the server). The
    excluded pins are the nearest here, so a search that dropped them from k hits would
    return fewer than k."""
    await milvus.ensure_version("v1", 8)
    records = [rec(f"s{i}") for i in range(30)]
    twin = EmbeddingRecord("twin", records[0].vector.copy(), "v1", "h" * 64, 1, time.time(),
                           time.time(), "/img/twin.png", "twin of s0")
    await milvus.upsert("v1", [*records, twin])
    assert await milvus.count("v1") == 31  # a Strong read: every row is searchable
    hits = await milvus.search("v1", records[0].vector, 5, exclude=["s0", "twin"])
    ids = [h.pin_id for h in hits]
    assert len(ids) == 5 and not {"s0", "twin"} & set(ids)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    exact = sorted(((float(r.vector @ records[0].vector), r.pin_id) for r in records[1:]),
                   reverse=True)
    assert ids == [p for _, p in exact[:5]]  # a growing segment is searched exactly
    assert hits[0].caption == f"caption {ids[0]}"
    got = await milvus.search("v1", records[0].vector, 3)
    assert {h.pin_id for h in got[:2]} == {"s0", "twin"}  # nothing excluded: they lead
