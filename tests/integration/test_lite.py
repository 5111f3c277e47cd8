"""Milvus Lite, the opt-in engine (``PINFRESH_STACK__MILVUS=lite``), on a small subset.

The server is the default and runs everything else; Lite is kept for machines
where the server cannot run (no network namespaces). This checks that the
launcher starts it and a worker writes through it end to end.
"""

from __future__ import annotations

import pytest

from streams.runtime.stack import EmbeddedStack, StackSettings
from tests.integration.conftest import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_a_worker_writes_through_milvus_lite(tmp_path, stamps, catalog):
    data = tmp_path / "stack"
    st = EmbeddedStack(StackSettings(data_dir=data, kafka_port=0, redis_port=0, milvus_port=0,
                                     milvus="lite"))
    info = st.start()
    try:
        assert info.milvus_engine == "lite"
        assert (data / "milvus" / "ENGINE").read_text().strip() == "lite"
        p = Pipeline(info, data, stamps, tmp_path)
        await p.setup()
        try:
            items = catalog[:12]
            p.start_worker("w1")
            await p.publish([it.event(1) for it in items])
            meta, letters = await p.settle([it.pin_id for it in items], timeout=300)
            assert len(meta) == len(items) and not letters
            version = await p.cache.get_live()
            assert await p.milvus.count(version) == len(items)
            hits = await p.milvus.search(version, (await p.milvus.get_many(
                version, [items[0].pin_id]))[items[0].pin_id].vector, 3)
            assert hits[0].pin_id == items[0].pin_id
        finally:
            await p.close()
    finally:
        st.stop()
