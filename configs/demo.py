"""The CPU demo: ``sleep-jax demo [--config configs/demo.py[:quick]] [--config.demo.KEY=VALUE]``.

Presets: the default (about 10 minutes for one seed on 2 CPU cores) and ``quick`` (a
short smoke run with tiny budgets; the tests shrink it further). ``seeds`` runs seeds
demo.seed, demo.seed + 1, ...; ``demo`` holds every size and budget of
``sleep_jax.demo.DemoConfig`` (methods as a tuple, e.g.
``--config.demo.methods="('sft','sleep')"``; the methods are listed in sleep_jax/demo.py).
``rows``: "default" runs demo.methods; "full" runs every baseline of the comparison
(``sleep_jax.demo.FULL_ROWS``), about twice the time; "dream" runs dreaming's rows
(``sleep_jax.demo.DREAM_ROWS``: sleep, sleep + dreaming, its untrained-generator and
extra-steps controls, dreaming alone; the generator is trained on the TASK entities first).
``demo.row_settings`` gives rows their own lr / replay (chosen on seed 3's validation).
"""

import ml_collections

from sleep_jax.config import section
from sleep_jax.demo import DemoConfig

_PRESETS = {
    "default": {},
    "quick": dict(base_steps=60, sleep_steps=20, n_old=40, n_new=8, rc_items=400,
                  eval_every=10),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "default"
    if name not in _PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; allowed: {', '.join(_PRESETS)}")
    config = ml_collections.ConfigDict()
    config.preset = name
    config.seeds = 1
    config.rows = "default"  # "full" / "dream": FULL_ROWS / DREAM_ROWS instead of demo.methods
    config.demo = section(DemoConfig, **_PRESETS[name])
    return config
