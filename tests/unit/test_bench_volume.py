"""The volume benchmark's recall bookkeeping (`streams.bench.volume`)."""

from __future__ import annotations

import itertools

import numpy as np

from streams.bench.volume import _recall, _top10, _update_ids


def _vecs(n: int = 60) -> np.ndarray:
    v = np.random.default_rng(3).standard_normal((n, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_recall_of_exact_hits_is_one_and_of_half_of_them_a_half():
    vecs = _vecs()
    picks = np.arange(10)
    top = _top10(vecs, picks)
    assert all(int(i) not in row for i, row in zip(picks, top, strict=True))  # itself excluded
    exact = [{f"v{j}" for j in row} for row in top]
    assert _recall(vecs, picks, exact) == [1.0] * 10
    half = [set(sorted(h)[:5]) | {"v999", "v998"} for h in exact]
    assert _recall(vecs, picks, half) == [0.5] * 10


def test_a_query_whose_neighbours_an_update_changes_is_left_out():
    """An update gives pin i the image of pin i + 1: a query near i + 1 then has i as a
    new neighbour (an exact duplicate), whether or not the update had landed when it
    ran; such a query is not counted, nor one whose own pin or old neighbour changed."""
    vecs = _vecs()
    picks = np.arange(20, 40)
    before = _top10(vecs, picks)
    j = int(before[0][0])  # the nearest neighbour of query 20
    updated = (j - 1) % len(vecs)  # its update makes it a copy of j
    after = vecs.copy()
    after[updated] = vecs[j]
    hits = [{f"v{k}" for k in row} for row in before]
    kept_without = _recall(vecs, picks, hits, skip={updated})
    kept_with = _recall(vecs, picks, hits, skip={updated}, after=after)
    assert len(kept_with) < len(kept_without)  # query 20 (at least) is left out now
    near_after = _top10(after, picks)
    expected = sum(1 for n, i in enumerate(picks) if int(i) != updated
                   and updated not in {int(k) for k in (*before[n], *near_after[n])})
    assert len(kept_with) == expected


def test_both_processes_see_the_same_updates():
    a = list(itertools.islice(_update_ids(1000), 3000))
    b = list(itertools.islice(_update_ids(1000), 3000))
    assert a == b and min(a) >= 0 and max(a) < 1000 and len(set(a)) > 900
