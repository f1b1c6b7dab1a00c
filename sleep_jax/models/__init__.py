"""Models: the Llama-family NNX decoder, presets, the plug-in protocol and sharding helpers."""

from sleep_jax.models.config import PRESETS, ModelConfig, RopeScaling, get_preset, param_count
from sleep_jax.models.llama import Decoder, SlotMask
from sleep_jax.models.sharding import create_sharded, logical_axes, shard_model, state_shardings

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "get_preset", "param_count", "Decoder",
           "SlotMask", "create_sharded", "logical_axes", "shard_model", "state_shardings",
           "create_model"]


def create_model(cfg: ModelConfig, mesh=None, seed: int = 0, rules=None) -> Decoder:
    """A Decoder for ``cfg`` with random weights, sharded on ``mesh`` when given."""
    from flax import nnx

    from sleep_jax.mesh import RULES

    factory = lambda: Decoder(cfg, rngs=nnx.Rngs(seed))
    if mesh is None:
        return factory()
    return create_sharded(factory, mesh, rules or RULES)
