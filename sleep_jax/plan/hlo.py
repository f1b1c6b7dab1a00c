"""What a compiled program does, read from its optimized HLO text: collectives and loops.

``collectives(text)`` counts all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute instructions (synchronous, or the ``-start`` half of an async pair; ``-done``
is not counted again) in every computation of the module, with their bytes per chip (the HLO is
SPMD-partitioned: shapes are per device): the full buffer each one moves, its result, or for a
reduce-scatter its operand (result x group size).
``while_loops(text)`` lists the while loops left after optimization with their known trip
counts (None when the loop's condition is dynamic): ``cost_analysis`` counts a loop body once,
so a step with loops left undercounts by their trip counts.
"""

from __future__ import annotations

import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
          "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(text: str, rank0: bool = False) -> float:
    """Bytes of every array type written in ``text`` (e.g. ``(f32[8,4]{1,0}, bf16[2])``);
    rank-0 arrays (async context scalars) only with ``rank0``."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        if not dims and not rank0:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _BYTES[dtype]
    return total


_CHANNEL = re.compile(r"channel_id=(\d+)")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")


def group_size(line: str) -> int:
    """Devices per replica group of a collective instruction (1 when not written)."""
    m = _GROUPS_LIST.search(line)
    if m:
        return max(len([x for x in m.group(1).split(",") if x]), 1)
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _GROUPS_MESH.search(line)  # mesh['axis_0'=4,'axis_1'=2], device_ids=... {'axis_0'}
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= int(sizes.get(axis, 1))
        return n
    return 1


def collectives(text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": n, "bytes": per-chip bytes}} over the module's collectives.

    An instruction's bytes are its result's (per chip), except a reduce-scatter's: result x
    group size, its full operand. One collective may be written more than once (TPU's async
    collectives repeat it in their start and done fusions): instructions sharing a channel_id
    count once.
    """
    out = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
    seen: set[tuple[str, str]] = set()
    for line in text.splitlines():
        if "=" not in line:
            continue
        for kind in KINDS:
            op = next((o for o in (kind, kind + "-start") if f" {o}(" in line), None)
            if op is None:
                continue
            ch = _CHANNEL.search(line)
            if ch:
                if (kind, ch.group(1)) in seen:
                    break
                seen.add((kind, ch.group(1)))
            head = line.split(f" {op}(", 1)[0]
            result = head.split("=", 1)[1]
            r = shape_bytes(result)
            if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
                # the start's result tuple is (operands, results[, context scalars])
                arrays = [shape_bytes(a.group(0)) for a in _ARRAY.finditer(result)]
                arrays = [a for a in arrays if a]
                r = sum(arrays[len(arrays) // 2:])
            if kind == "reduce-scatter":
                r *= group_size(line)
            out[kind]["count"] += 1
            out[kind]["bytes"] += r
            break
    return out


def while_loops(text: str) -> list[int | None]:
    """Known trip count (or None) of each while instruction in the module."""
    trips = []
    for line in text.splitlines():
        if " while(" in line and "=" in line:
            m = _TRIP.search(line)
            trips.append(int(m.group(1)) if m else None)
    return trips
