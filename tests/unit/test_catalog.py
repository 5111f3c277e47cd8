"""Catalog files: what a bad line says."""

from __future__ import annotations

import json

import pytest

from streams.runtime.catalog import CatalogError, load_catalog


def test_a_line_without_image_names_the_field_and_the_line(tmp_path):
    cat = tmp_path / "c.jsonl"
    cat.write_text(json.dumps({"pin_id": "a", "image": "/x.png"}) + "\n"
                   + json.dumps({"pin_id": "b"}) + "\n")
    with pytest.raises(CatalogError, match=r"c\.jsonl:2: missing field 'image'.*\"pin_id\" and"):
        list(load_catalog(cat))


def test_a_line_that_is_not_json_names_the_line(tmp_path):
    cat = tmp_path / "c.jsonl"
    cat.write_text("{not json\n")
    with pytest.raises(CatalogError, match=r"c\.jsonl:1: "):
        list(load_catalog(cat))


def test_training_prepares_a_missing_default_catalog(tmp_path):
    """`encoder train`/`eval` in a data dir where `catalog prepare` never ran: made, not an
    error (the trial's `encoder train --out ...` with another data dir stopped here)."""
    from streams.runtime.models import default_catalogs
    from streams.settings import Settings, StackSettings

    s = Settings(stack=StackSettings(data_dir=tmp_path / "other"))
    assert not s.paths.catalog("tuxpaint").exists()
    (path,) = default_catalogs(s, ("tuxpaint",))
    assert path == s.paths.catalog("tuxpaint")
    lines = path.read_text().splitlines()
    assert len(lines) > 100 and all('"caption"' in x for x in lines[:5])


def test_prepare_with_no_stamps_says_so_and_exits_non_zero(tmp_path, monkeypatch):
    """The stamps package still installing (an empty folder): not a catalog of 0 pins."""
    from click.testing import CliRunner

    import streams.runtime.catalog as cat
    from streams.cli import cli

    empty = tmp_path / "stamps"
    empty.mkdir()
    monkeypatch.setattr(cat, "stamps_dir", lambda _data: empty)
    with pytest.raises(CatalogError, match="no captioned Tux Paint stamp"):
        cat.prepare_sample_catalog(tmp_path)
    monkeypatch.setenv("PINFRESH_STACK__DATA_DIR", str(tmp_path))
    res = CliRunner().invoke(cli, ["catalog", "prepare", "--no-emoji"])
    assert res.exit_code == 1 and "no captioned Tux Paint stamp" in res.output
