"""`MilvusStore.search`: exclusions and HNSW's ``ef``, against a fake with the server's rules."""

from __future__ import annotations

import numpy as np
import pytest
from pymilvus import MilvusException

from store.config import MilvusSettings


class HnswServer:
    """Answers a search like Milvus 2.3.5 over an HNSW index: nearest first, at most
    ``limit`` hits, and refuses an ``ef`` below the topk (knowhere: "ef(N) should be
    larger than k(M)", a plain server error)."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows
        self.limits: list[int] = []

    def load_collection(self, name, timeout=None):
        pass

    def describe_collection(self, name, timeout=None):
        return {"fields": [{"name": "metadata"}]}

    def search(self, name, data, limit, output_fields, search_params, timeout=None,
               filter=""):
        assert filter == ""  # exclusions are not sent as an expression
        self.limits.append(limit)
        ef = search_params["params"].get("ef")
        if ef is not None and ef < limit:
            raise MilvusException(code=65535, message=f"ef({ef}) should be larger than k({limit})")
        q = np.asarray(data[0], np.float32)
        order = sorted(self.rows, key=lambda p: -float(self.rows[p] @ q))[:limit]
        return [[{"id": p, "distance": float(self.rows[p] @ q),
                  "entity": {"caption": f"c {p}", "image_location": ""}} for p in order]]

    def close(self):
        pass


@pytest.fixture
def server(monkeypatch):
    import store.milvus as m

    rng = np.random.default_rng(0)
    rows = {f"p{i}": v / np.linalg.norm(v) for i, v in
            enumerate(rng.standard_normal((40, 8)).astype(np.float32))}
    fake = HnswServer(rows)
    monkeypatch.setattr(m, "connect", lambda *a, **k: fake)
    return fake


async def test_excluded_pins_are_dropped_from_k_plus_their_number_of_hits(server):
    import store.milvus as m

    store = m.MilvusStore(MilvusSettings())
    try:
        q = server.rows["p0"]
        nearest = sorted(server.rows, key=lambda p: -float(server.rows[p] @ q))
        hits = await store.search("v1", q, 5, exclude=[nearest[0], nearest[2], nearest[2]])
        assert [h.pin_id for h in hits] == [nearest[1], *nearest[3:7]]
        assert server.limits == [7]  # k + the distinct excluded pins
    finally:
        await store.close()


async def test_a_configured_ef_is_raised_to_the_hits_asked_for(server):
    """`ef` 5 with k 5 worked when exclusions were a filter; k + exclusions = 6 hits need
    ef >= 6, or every `similar` by pin fails."""
    import store.milvus as m

    store = m.MilvusStore(MilvusSettings(search_params={"ef": 5}))
    try:
        hits = await store.search("v1", server.rows["p0"], 5, exclude=["p0"])
        assert len(hits) == 5 and "p0" not in {h.pin_id for h in hits}
        assert store.settings.search_params == {"ef": 5}  # the setting itself is kept
        many = await store.search("v1", server.rows["p0"], 3)
        assert len(many) == 3 and server.limits == [6, 3]
    finally:
        await store.close()


async def test_the_hits_asked_for_stop_at_milvus_topk_limit(server):
    import store.milvus as m

    store = m.MilvusStore(MilvusSettings(search_params={"ef": "64"}))  # as an env var gives it
    try:
        assert store.settings.search_params == {"ef": 64}
        hits = await store.search("v1", server.rows["p0"], 10, exclude=[f"x{i}" for i in
                                                                         range(m.MAX_TOPK)])
        assert len(hits) == 10 and server.limits == [m.MAX_TOPK]
        await store.search("v1", server.rows["p0"], 10)
        assert server.limits[-1] == 10  # ef 64 >= 10: left as configured, no error
    finally:
        await store.close()


@pytest.mark.parametrize("bad", [0, -3, 1.5, "64.5", "many"])
def test_an_ef_that_is_not_a_count_is_refused_at_start_up(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="search_params.ef must be a positive whole"):
        MilvusSettings(search_params={"ef": bad})
    with pytest.raises(ValidationError, match="search_list"):
        MilvusSettings(search_params={"search_list": bad})
    assert MilvusSettings(search_params={"nprobe": 16}).search_params == {"nprobe": 16}
