"""Growth: ``sleep-jax grow --config configs/grow.py --checkpoint SRC --out DST``.

``to`` names the target sizes (``--config.to=layers=6,embed=256``; growable keys in
sleep_jax/grow/spec.py; the default adds 4 pre-allocated expert slots of rank 32, the paper's
growth), ``options`` how each operator grows (sleep_jax.grow.spec.GrowOptions), ``mesh`` where
the grown model is written (default: all devices on fsdp).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.grow.spec import GrowOptions


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/grow.py takes no preset (got {arg!r}); set --config.to")
    config = ml_collections.ConfigDict()
    config.to = "expert_slots=4,expert_rank=32"
    config.mesh = "fsdp=-1"
    config.seed = 0
    config.options = section(GrowOptions)
    return config
