"""Function-preserving parameter growth, jitted and written straight onto a target mesh.

Operators (each a list of axis plans over logical names): expert slots (the paper's growth),
width (HyperCloning replication or zero-pad), attention heads and FFN (Net2Net split or zero-init
units), depth (identity layers), and the non-preserving G_stack baseline; optimizer moments map
with each operator's gradient rule (new entries get their own Adam count, ``entry_clocks``).
``grow`` composes them into one jitted function. Expert slots are allocated once and handed out
by ``next_free_slot`` (``SlotsExhausted`` when all are used).
"""

from sleep_jax.grow.api import (
    compile_growth,
    grow,
    grow_arrays,
    grow_model,
    grown_config,
    plan_growth,
)
from sleep_jax.grow.experts import (
    SlotsExhausted,
    activate_slot,
    next_free_slot,
    reset_slots,
    used_slots,
)
from sleep_jax.grow.optimizer import EntryClockState, entry_clocks
from sleep_jax.grow.spec import GrowOptions, check_growth, parse_overrides, target_config

__all__ = ["EntryClockState", "GrowOptions", "SlotsExhausted", "activate_slot", "check_growth",
           "compile_growth", "entry_clocks", "grow", "grow_arrays", "grow_model", "grown_config",
           "next_free_slot", "parse_overrides", "plan_growth", "reset_slots", "target_config",
           "used_slots"]
