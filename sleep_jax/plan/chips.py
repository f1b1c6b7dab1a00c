"""Published per-chip figures of TPU generations, for the roofline of a mesh plan.

Each figure is the vendor's per-chip number (dense bf16 peak, HBM capacity and bandwidth,
bidirectional inter-chip interconnect bandwidth), with its source:

- v4:  https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s). The
  Cloud page gives no per-chip ICI figure; 6 links x 90 GB/s bidirectional (45 GB/s each way)
  from https://jax-ml.github.io/scaling-book/tpus/ (not a vendor page).
- v5e: https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB at 819 GB/s, ICI 400 GB/s
  bidirectional per chip).
- v5p: https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB at 2765 GB/s, ICI
  1200 GB/s bidirectional per chip).
- v6e: https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB at 1638 GB/s, ICI
  800 GB/s bidirectional per chip).
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip: peak bf16 FLOP/s, HBM bytes and bytes/s, ICI bytes/s (bidirectional)."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bw: float
    ici_bw: float
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 6 * 90e9,
               "https://cloud.google.com/tpu/docs/v4; ICI: https://jax-ml.github.io/scaling-book/tpus/"),
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 918e12, 32e9, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}


def chip_of(topology: str) -> Chip:
    """The chip of a topology name such as ``v5e:16x16`` (the part before the colon)."""
    gen = topology.split(":", 1)[0].strip().lower()
    if gen not in CHIPS:
        raise ValueError(f"topology {topology!r}: unknown TPU generation {gen!r}; allowed: "
                         f"{', '.join(CHIPS)} (e.g. v5e:16x16, v4:2x2x2, v5p:2x2x4, v6e:4x4)")
    return CHIPS[gen]


def roofline(flops: float, hbm_bytes: float, ici_bytes: float, chip: Chip) -> dict[str, float]:
    """Per-chip step-time bounds (seconds) and their max: compute at peak, HBM traffic at HBM
    bandwidth, collective bytes at ICI bandwidth (no overlap assumed between them beyond max)."""
    t = {"compute_s": flops / chip.peak_flops, "hbm_s": hbm_bytes / chip.hbm_bw,
         "ici_s": ici_bytes / chip.ici_bw}
    t["step_s"] = max(t.values())
    t["bound"] = max(("compute_s", "hbm_s", "ici_s"), key=t.get)[:-2]
    return t
