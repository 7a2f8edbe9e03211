"""The region layout, declared once and checked at import.

A region is one POSIX shared-memory object per VM, exposed to that VM as the
BAR2 memory of an ``ivshmem-plain`` device.  All integers are little-endian.
The first 4 KiB page is the header; the rest holds two rings of equal capacity::

    offset  size  field               written by  meaning
    ------  ----  ------------------  ----------  -----------------------------------------------
         0     8  magic               broker      b"IVCLIP\\x00\\x01"; written last at init, checked first
         8     4  layout_version      broker      LAYOUT_VERSION, exact match required
        12     4  header_size         broker      HEADER_SIZE
        16     8  region_size         broker      size of the whole region in bytes (power of two)
        24    16  session_id          broker      fresh random bytes at every (re-)initialisation
        40     4  max_record          broker      largest record payload either side may write
        44    20  (reserved, zero)
        64     8  g2h_offset          broker      guest-to-host ring data offset
        72     8  g2h_capacity        broker      guest-to-host ring data size
        80     8  h2g_offset          broker      host-to-guest ring data offset
        88     8  h2g_capacity        broker      host-to-guest ring data size
        96    32  (reserved, zero)
       128     4  capabilities        broker      mirror of the broker's private capability bits
                                                  (bits defined by the protocol package)
       132     4  (reserved, zero)
       136     8  broker_heartbeat    broker      counter, bumped about every HEARTBEAT_PERIOD_S
       144   112  (reserved, zero)
       256    16  guest_session       guest       the session_id the guest driver attached to
       272     8  guest_epoch         guest       random, fresh at every driver start
       280     8  guest_heartbeat     guest       counter, bumped about every HEARTBEAT_PERIOD_S
       288     4  guest_version       guest       driver protocol version
       292   220  (reserved, zero)
       512     8  g2h_tail            guest       producer index of the guest-to-host ring
       640     8  g2h_head            broker      consumer index of the guest-to-host ring
       768     8  h2g_tail            broker      producer index of the host-to-guest ring
       896     8  h2g_head            guest       consumer index of the host-to-guest ring
      1024  3072  (reserved, zero)
      4096     C  g2h ring data
    4096+C     C  h2g ring data       (C = ring_capacity(region_size))

Ring indices are free-running byte counters modulo the largest multiple of the
capacity below 2**64 (shm.ring.ring_wrap): position = index % capacity.
Each hot index sits alone in a 128-byte block so that the producer and consumer
never share a cache line (nor the adjacent line the prefetcher pairs with it).

The broker never reads the geometry back from shared memory: it recomputes it
from the region size it created.  A guest driver checks every field against
the size it actually mapped (:func:`expected_geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"IVCLIP\x00\x01"
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
CACHE_BLOCK = 128
MIN_REGION_SIZE = 1 << 20
MAX_REGION_SIZE = 1 << 30
DEFAULT_REGION_SIZE = 4 << 20
SESSION_ID_SIZE = 16
RECORD_HEADER_SIZE = 8
RECORD_ALIGN = 8
# A record must fit contiguously with room to spare so that a producer always
# makes progress after a wrap: at most a quarter of the ring, and never more
# than 1 MiB (bigger payloads travel in chunks, see protocol.messages).
MAX_RECORD_CAP = 1 << 20
HEARTBEAT_PERIOD_S = 0.25


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    offset: int
    size: int
    writer: str  # "broker" or "guest"


FIELDS: tuple[Field, ...] = (
    Field("magic", 0, 8, "broker"),
    Field("layout_version", 8, 4, "broker"),
    Field("header_size", 12, 4, "broker"),
    Field("region_size", 16, 8, "broker"),
    Field("session_id", 24, SESSION_ID_SIZE, "broker"),
    Field("max_record", 40, 4, "broker"),
    Field("g2h_offset", 64, 8, "broker"),
    Field("g2h_capacity", 72, 8, "broker"),
    Field("h2g_offset", 80, 8, "broker"),
    Field("h2g_capacity", 88, 8, "broker"),
    Field("capabilities", 128, 4, "broker"),
    Field("broker_heartbeat", 136, 8, "broker"),
    Field("guest_session", 256, SESSION_ID_SIZE, "guest"),
    Field("guest_epoch", 272, 8, "guest"),
    Field("guest_heartbeat", 280, 8, "guest"),
    Field("guest_version", 288, 4, "guest"),
    Field("g2h_tail", 512, 8, "guest"),
    Field("g2h_head", 640, 8, "broker"),
    Field("h2g_tail", 768, 8, "broker"),
    Field("h2g_head", 896, 8, "guest"),
)

OFF: dict[str, int] = {f.name: f.offset for f in FIELDS}

# Names for the offsets used on hot paths.
MAGIC_OFF = OFF["magic"]
LAYOUT_VERSION_OFF = OFF["layout_version"]
HEADER_SIZE_OFF = OFF["header_size"]
REGION_SIZE_OFF = OFF["region_size"]
SESSION_ID_OFF = OFF["session_id"]
MAX_RECORD_OFF = OFF["max_record"]
G2H_OFFSET_OFF = OFF["g2h_offset"]
G2H_CAPACITY_OFF = OFF["g2h_capacity"]
H2G_OFFSET_OFF = OFF["h2g_offset"]
H2G_CAPACITY_OFF = OFF["h2g_capacity"]
CAPABILITIES_OFF = OFF["capabilities"]
BROKER_HEARTBEAT_OFF = OFF["broker_heartbeat"]
GUEST_SESSION_OFF = OFF["guest_session"]
GUEST_EPOCH_OFF = OFF["guest_epoch"]
GUEST_HEARTBEAT_OFF = OFF["guest_heartbeat"]
GUEST_VERSION_OFF = OFF["guest_version"]
G2H_TAIL_OFF = OFF["g2h_tail"]
G2H_HEAD_OFF = OFF["g2h_head"]
H2G_TAIL_OFF = OFF["h2g_tail"]
H2G_HEAD_OFF = OFF["h2g_head"]

HOT_INDEX_FIELDS = ("g2h_tail", "g2h_head", "h2g_tail", "h2g_head")


def _require(ok: bool, why: str) -> None:
    if not ok:  # not `assert`: these checks must survive `python -O`
        raise ImportError(f"ivclip region layout is inconsistent: {why}")


def _check_layout() -> None:
    """Static asserts of the table above; runs at import."""
    end = 0
    for field in sorted(FIELDS, key=lambda f: f.offset):
        _require(field.offset >= end, f"{field.name} overlaps the field before it")
        _require(field.offset % min(field.size, 8) == 0, f"{field.name} is misaligned")
        _require(field.writer in ("broker", "guest"), field.name)
        end = field.offset + field.size
    _require(end <= HEADER_SIZE, "header fields overflow the header page")
    blocks: dict[int, str] = {}
    for name in HOT_INDEX_FIELDS:
        block = OFF[name] // CACHE_BLOCK
        _require(OFF[name] % CACHE_BLOCK == 0, f"{name} does not start a cache block")
        _require(block not in blocks, f"{name} shares a cache block with {blocks.get(block)}")
        blocks[block] = name
    # Guest-written fields never share a cache block with broker-written ones.
    owner: dict[int, str] = {}
    for field in FIELDS:
        for block in range(field.offset // CACHE_BLOCK, (field.offset + field.size - 1) // CACHE_BLOCK + 1):
            _require(
                owner.setdefault(block, field.writer) == field.writer,
                f"{field.name} shares a cache block with a field the other side writes",
            )
    _require(len(MAGIC) == 8 and HEADER_SIZE % 4096 == 0, "magic or header size")


_check_layout()


@dataclass(frozen=True, slots=True)
class RingGeometry:
    """Where one ring lives in a region."""

    data_offset: int
    capacity: int
    producer_index_offset: int
    consumer_index_offset: int


@dataclass(frozen=True, slots=True)
class RegionGeometry:
    """Everything about a region that follows from its size."""

    region_size: int
    max_record: int
    guest_to_host: RingGeometry
    host_to_guest: RingGeometry


def valid_region_size(size: int) -> bool:
    return MIN_REGION_SIZE <= size <= MAX_REGION_SIZE and size & (size - 1) == 0


def ring_capacity(region_size: int) -> int:
    """Each ring gets half of what the header leaves, rounded down to whole pages."""
    return ((region_size - HEADER_SIZE) // 2) & ~4095


def expected_geometry(region_size: int) -> RegionGeometry:
    """The only valid geometry for a region of `region_size` bytes.

    Raises:
        ValueError: the size is not a power of two between 1 MiB and 1 GiB.
    """
    if not valid_region_size(region_size):
        raise ValueError(
            f"region size {region_size} must be a power of two between "
            f"{MIN_REGION_SIZE} and {MAX_REGION_SIZE} bytes"
        )
    capacity = ring_capacity(region_size)
    max_record = min(MAX_RECORD_CAP, capacity // 4)
    return RegionGeometry(
        region_size=region_size,
        max_record=max_record,
        guest_to_host=RingGeometry(HEADER_SIZE, capacity, G2H_TAIL_OFF, G2H_HEAD_OFF),
        host_to_guest=RingGeometry(HEADER_SIZE + capacity, capacity, H2G_TAIL_OFF, H2G_HEAD_OFF),
    )
