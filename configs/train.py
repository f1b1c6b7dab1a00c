"""Training presets: ``--config configs/train.py:<preset>`` with ``--config.key=value`` overrides.

Presets: tiny (CPU demo/tests, built-in text), smollm2_135m, llama_1b, llama_1p1b, llama_8b
(accelerators: bf16 compute with fp32 parameters, layer remat).
"""

import ml_collections

from sleep_jax.config import model_section, rules_section, section
from sleep_jax.mesh import RULES
from sleep_jax.train.cli import DataConfig
from sleep_jax.train.optim import OptimConfig
from sleep_jax.train.trainer import TrainConfig

_PRESETS = {
    "tiny": dict(model={}, mesh="fsdp=-1",
                 optim=dict(lr=3e-3, warmup_steps=10),
                 train=dict(steps=200, batch_size=8, seq_len=64, checkpoint_every=50)),
    "smollm2_135m": dict(model=dict(dtype="bfloat16", remat="dots", attention="auto"),
                         mesh="fsdp=-1", optim=dict(lr=1e-3, warmup_steps=100),
                         train=dict(steps=2000, batch_size=64, seq_len=2048)),
    "llama_1p1b": dict(model=dict(dtype="bfloat16", remat="dots", attention="auto"),
                       mesh="fsdp=-1", optim=dict(lr=4e-4, warmup_steps=200),
                       train=dict(steps=5000, batch_size=64, seq_len=2048)),
    "llama_1b": dict(model=dict(dtype="bfloat16", remat="dots", attention="auto"),
                     mesh="fsdp=-1", optim=dict(lr=3e-4, warmup_steps=200),
                     train=dict(steps=5000, batch_size=64, seq_len=2048)),
    "llama_8b": dict(model=dict(dtype="bfloat16", remat="full", attention="auto"),
                     mesh="fsdp=-1", optim=dict(lr=1.5e-4, warmup_steps=500),
                     train=dict(steps=5000, batch_size=128, seq_len=4096, micro_batches=4)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The preset named by ``arg`` (default tiny)."""
    name = arg or "tiny"
    if name not in _PRESETS:
        raise ValueError(f"unknown train preset {name!r}; allowed: {', '.join(_PRESETS)}")
    p = _PRESETS[name]
    config = ml_collections.ConfigDict()
    config.preset = name
    config.model = model_section(name, **p["model"])
    config.mesh = p["mesh"]
    config.rules = rules_section(RULES)  # logical axis -> "mesh,axes" ("" = replicated)
    config.optim = section(OptimConfig, **p["optim"])
    config.train = section(TrainConfig, **p["train"])
    config.data = section(DataConfig, **p.get("data", {}))
    return config
