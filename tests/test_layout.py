"""Tests for shm.layout: the header table, its import-time checks, and region geometry."""

from __future__ import annotations

import itertools
import re

import pytest

from shm import layout
from shm.layout import CACHE_BLOCK, FIELDS, HEADER_SIZE, Field

VALID_SIZES = [1 << shift for shift in range(20, 31)]  # 1 MiB .. 1 GiB

# The wire format, written out independently of the module: editing an offset
# in layout.py without meaning to must fail here.
EXPECTED_FIELDS = {
    "magic": (0, 8, "broker"),
    "layout_version": (8, 4, "broker"),
    "header_size": (12, 4, "broker"),
    "region_size": (16, 8, "broker"),
    "session_id": (24, 16, "broker"),
    "max_record": (40, 4, "broker"),
    "g2h_offset": (64, 8, "broker"),
    "g2h_capacity": (72, 8, "broker"),
    "h2g_offset": (80, 8, "broker"),
    "h2g_capacity": (88, 8, "broker"),
    "capabilities": (128, 4, "broker"),
    "broker_heartbeat": (136, 8, "broker"),
    "guest_session": (256, 16, "guest"),
    "guest_epoch": (272, 8, "guest"),
    "guest_heartbeat": (280, 8, "guest"),
    "guest_version": (288, 4, "guest"),
    "g2h_tail": (512, 8, "guest"),
    "g2h_head": (640, 8, "broker"),
    "h2g_tail": (768, 8, "broker"),
    "h2g_head": (896, 8, "guest"),
}


def _blocks(field: Field) -> range:
    return range(field.offset // CACHE_BLOCK, (field.offset + field.size - 1) // CACHE_BLOCK + 1)


# The real table -------------------------------------------------------------
def test_fields_match_the_wire_format():
    assert {f.name: (f.offset, f.size, f.writer) for f in FIELDS} == EXPECTED_FIELDS
    assert len(FIELDS) == len(EXPECTED_FIELDS)  # no duplicate names hiding in the dict


def test_docstring_table_matches_fields():
    """The module docstring is the byte-by-byte documentation; it must agree with FIELDS."""
    documented = {}
    for line in (layout.__doc__ or "").splitlines():
        match = re.match(r"\s+(\d+)\s+(\d+)\s+([a-z0-9_]+)\s+(broker|guest)\s", line)
        if match:
            offset, size, name, writer = match.groups()
            documented[name] = (int(offset), int(size), writer)
    assert documented == {f.name: (f.offset, f.size, f.writer) for f in FIELDS}


def test_offset_constants_match_the_table():
    for field in FIELDS:
        assert getattr(layout, f"{field.name.upper()}_OFF") == field.offset
        assert layout.OFF[field.name] == field.offset


def test_fields_do_not_overlap_and_are_aligned_inside_the_header():
    ordered = sorted(FIELDS, key=lambda f: f.offset)
    for before, after in itertools.pairwise(ordered):
        assert before.offset + before.size <= after.offset, (before.name, after.name)
    for field in FIELDS:
        assert field.offset % min(field.size, 8) == 0, field.name
        assert field.offset >= 0 and field.offset + field.size <= HEADER_SIZE


def test_each_hot_index_owns_a_whole_cache_block():
    assert set(layout.HOT_INDEX_FIELDS) == {"g2h_tail", "g2h_head", "h2g_tail", "h2g_head"}
    hot_blocks = []
    for name in layout.HOT_INDEX_FIELDS:
        assert layout.OFF[name] % CACHE_BLOCK == 0, name
        block = layout.OFF[name] // CACHE_BLOCK
        hot_blocks.append(block)
        others = [f.name for f in FIELDS if f.name != name and block in _blocks(f)]
        assert others == [], f"{name} shares its cache block with {others}"
    assert len(set(hot_blocks)) == len(hot_blocks)
    # 128-byte blocks: no pair of hot indices sits on adjacent 64-byte lines either.
    assert CACHE_BLOCK >= 128


def test_guest_and_broker_fields_never_share_a_cache_block():
    writers: dict[int, set[str]] = {}
    for field in FIELDS:
        for block in _blocks(field):
            writers.setdefault(block, set()).add(field.writer)
    assert all(len(w) == 1 for w in writers.values()), writers


def test_constants():
    assert layout.MAGIC == b"IVCLIP\x00\x01"
    assert HEADER_SIZE == 4096
    assert layout.MIN_REGION_SIZE == 1 << 20 and layout.MAX_REGION_SIZE == 1 << 30
    assert layout.valid_region_size(layout.DEFAULT_REGION_SIZE)


# The import-time checker can fail ------------------------------------------------
def _with_field(monkeypatch: pytest.MonkeyPatch, replacement: Field) -> None:
    fields = (*(f for f in FIELDS if f.name != replacement.name), replacement)
    monkeypatch.setattr(layout, "FIELDS", fields)
    monkeypatch.setattr(layout, "OFF", {f.name: f.offset for f in fields})


def test_checker_accepts_the_real_table():
    layout._check_layout()


@pytest.mark.parametrize(
    ("field", "why"),
    [
        (Field("extra", 4, 8, "broker"), "overlaps"),
        (Field("extra", 46, 4, "broker"), "misaligned"),
        (Field("extra", 48, 4, "vm"), "extra"),
        (Field("extra", 4096, 8, "guest"), "overflow"),
        (Field("g2h_head", 520, 8, "broker"), "does not start a cache block"),
        (Field("guest_version", 132, 4, "guest"), "other side writes"),
        (Field("capabilities", 296, 4, "broker"), "other side writes"),
        (Field("g2h_tail", 576, 8, "guest"), "does not start a cache block"),
    ],
    ids=["overlap", "misaligned", "bad-writer", "overflow", "hot-misplaced",
         "guest-in-broker-block", "broker-in-guest-block", "hot-mid-block"],
)
def test_checker_rejects_a_broken_table(monkeypatch, field, why):
    _with_field(monkeypatch, field)
    with pytest.raises(ImportError, match=why):
        layout._check_layout()


# Geometry --------------------------------------------------------------------
@pytest.mark.parametrize("size", VALID_SIZES, ids=lambda s: f"{s >> 20}MiB")
def test_expected_geometry_for_every_valid_size(size):
    geometry = layout.expected_geometry(size)
    g2h, h2g = geometry.guest_to_host, geometry.host_to_guest
    assert geometry.region_size == size
    assert layout.valid_region_size(size)
    # Both rings the same whole-page size, after the header, inside the region, disjoint.
    assert g2h.capacity == h2g.capacity == layout.ring_capacity(size)
    assert g2h.capacity > 0 and g2h.capacity % 4096 == 0
    assert g2h.data_offset == HEADER_SIZE
    assert g2h.data_offset + g2h.capacity <= h2g.data_offset
    assert h2g.data_offset + h2g.capacity <= size
    assert h2g.data_offset % 4096 == 0
    # Rounding to pages wastes less than two pages.
    assert size - HEADER_SIZE - 2 * g2h.capacity < 2 * 4096
    # Records: a quarter of a ring at most, never over the cap, and bigger than a chunk header.
    assert 16 < geometry.max_record <= min(layout.MAX_RECORD_CAP, g2h.capacity // 4)
    assert geometry.max_record == min(layout.MAX_RECORD_CAP, g2h.capacity // 4)
    # Each ring's indices are the ones the table assigns to its writer.
    assert (g2h.producer_index_offset, g2h.consumer_index_offset) == (512, 640)
    assert (h2g.producer_index_offset, h2g.consumer_index_offset) == (768, 896)


def test_max_record_cap_reached_by_big_regions():
    assert layout.expected_geometry(1 << 20).max_record < layout.MAX_RECORD_CAP
    assert layout.expected_geometry(1 << 30).max_record == layout.MAX_RECORD_CAP


@pytest.mark.parametrize(
    "size",
    [0, -1, 1, 4096, (1 << 20) - 1, (1 << 19), (1 << 20) + 4096, 3 << 20, (1 << 30) + 1,
     1 << 31, 1 << 40, (1 << 21) - 4096],
)
def test_expected_geometry_refuses_invalid_sizes(size):
    assert not layout.valid_region_size(size)
    with pytest.raises(ValueError, match="power of two"):
        layout.expected_geometry(size)
