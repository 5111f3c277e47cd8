"""`end_offsets`: the log's ends on a broker whose ListOffsets is per batch (Tansu)."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from streams.producer import end_offsets


class SlowBroker:
    """A consumer on a broker that answers ListOffsets with a batch's base + 1 and whose
    first fetches come back empty (a broker just started): the records and the high
    watermark arrive only from the ``slow``-th round on."""

    def __init__(self, ends: dict[TopicPartition, int], slow: int) -> None:
        self.ends, self.slow, self.rounds = ends, slow, 0
        self.pos: dict[TopicPartition, int] = {}
        self.high: dict[TopicPartition, int] = {}

    async def end_offsets(self, tps):
        return {tp: 1 for tp in tps}  # one batch each: base offset 0, plus one

    async def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def assign(self, tps):
        self.assigned = list(tps)

    def seek(self, tp, offset):
        self.pos[tp] = offset

    def highwater(self, tp):
        return self.high.get(tp)

    async def getmany(self, *tps, timeout_ms=0):
        self.rounds += 1
        if self.rounds < self.slow:
            return {}
        out = {}
        for tp in tps:
            self.high[tp] = self.ends[tp]
            start = self.pos[tp]
            n = min(5, self.ends[tp] - start)  # a few records a round
            out[tp] = [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, None, b"", None, 0, 0,
                                      []) for o in range(start, start + n)]
            self.pos[tp] = start + n
        return {tp: recs for tp, recs in out.items() if recs}


async def test_partitions_whose_first_fetches_are_slow_are_counted_whole():
    tps = [TopicPartition("pins", p) for p in range(64)]
    ends = {tp: 12 + tp.partition % 3 for tp in tps}
    got = await end_offsets(SlowBroker(ends, slow=4), tps)  # type: ignore[arg-type]
    assert got == ends  # 64 before (one per partition: the ListOffsets answer)
