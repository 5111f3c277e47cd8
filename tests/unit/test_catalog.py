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
