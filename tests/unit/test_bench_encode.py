"""`pinfresh bench encode` end to end on a tiny corpus (CPU): the table's JSON is coherent."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streams.cli import cli
from tests.unit.test_prepare_paths import jpeg, photo


def test_bench_encode_writes_coherent_json(tmp_path, monkeypatch):
    images = tmp_path / "jpegs"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(jpeg(photo(i, 320, 400)))
    (images / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "encode.json"
    monkeypatch.setenv("PINFRESH_STACK__DATA_DIR", str(tmp_path / "data"))
    res = CliRunner().invoke(cli, ["bench", "encode", "--images", str(images), "--batch-size",
                                   "4", "--seconds", "0.05", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["images"] == 6 and r["batch_size"] == 4 and r["device"] == "cpu"
    assert r["image_sizes_sampled"] == ["320x400"]
    assert 1 <= r["mean_dispatched_batch"] <= 4
    for k in ("pipeline_img_per_s", "forward_only_img_per_s", "decode_resize_only_img_per_s",
              "naive_sequential_img_per_s"):
        assert r[k] > 0
    assert abs(r["pipeline_vs_forward_ceiling"]
               - r["pipeline_img_per_s"] / r["forward_only_img_per_s"]) < 0.01
    assert "bare forward" in res.output and "machine:" in res.output
