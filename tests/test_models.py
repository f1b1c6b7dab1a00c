"""The NNX Llama decoder: presets, RoPE, sharded forward equality, masks, packing, recompiles."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.mesh import make_mesh
from sleep_jax.models import (
    Decoder,
    ModelConfig,
    RopeScaling,
    create_model,
    get_preset,
    logical_axes,
    param_count,
)
from sleep_jax.models.llama import rope_inv_freq

PUBLISHED = {"smollm2_135m": 134_515_008, "llama_1b": 1_235_814_400, "llama_8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_shape_check_without_allocating(name):
    cfg = get_preset(name)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(math.prod(x.shape) for x in leaves) == PUBLISHED[name] == param_count(cfg)
    assert abstract.blocks.q.shape == (cfg.layers, cfg.embed, cfg.heads, cfg.head_dim)
    # every variable carries logical names of the right rank
    for names, x in zip(jax.tree.leaves(logical_axes(abstract), is_leaf=lambda t:
                                        isinstance(t, tuple)), jax.tree.leaves(
                                            nnx.state(abstract))):
        assert len(names) == len(x.shape)


def _rope_reference(H, theta, s: RopeScaling | None):
    """Loop-per-frequency transcription of HF's _compute_llama3_parameters."""
    out = []
    for i in range(0, H, 2):
        f = 1.0 / theta ** (i / H)
        if s is not None:
            wavelen = 2 * math.pi / f
            lo = s.original_max_position / s.low_freq_factor
            hi = s.original_max_position / s.high_freq_factor
            if wavelen > lo:
                f = f / s.factor
            elif wavelen >= hi:
                smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor)
                f = (1 - smooth) * f / s.factor + smooth * f
        out.append(f)
    return np.array(out)


@pytest.mark.parametrize("name", ["smollm2_135m", "llama_1b", "llama_8b"])
def test_rope_inv_freq_matches_reference(name):
    cfg = get_preset(name)
    got = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(got, _rope_reference(cfg.head_dim, cfg.rope_theta,
                                                    cfg.rope_scaling), rtol=1e-6)
    if cfg.rope_scaling is not None:  # scaling really changes the low frequencies
        assert got[-1] < 1.0 / cfg.rope_theta ** ((cfg.head_dim - 2) / cfg.head_dim) / 2


def _inputs(cfg, B=8, T=12, seed=1):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return tokens, positions


def _forward(model, tokens, positions, **kw):
    return nnx.jit(lambda m, t, p: m(t, p, **kw)[0])(model, tokens, positions)


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4", "fsdp=2,tensor=4"])
def test_sharded_forward_equals_single_device(spec):
    cfg = get_preset("tiny", heads=8, kv_heads=4, mlp=128)
    tokens, positions = _inputs(cfg)
    ref = np.asarray(_forward(create_model(cfg, seed=3), tokens, positions))
    mesh = make_mesh(spec)
    model = create_model(cfg, mesh=mesh, seed=3)
    # parameter shard shapes are what the rules say (embed->fsdp, heads/mlp/vocab->tensor)
    f, t = mesh.shape["fsdp"], mesh.shape["tensor"]
    shard = model.blocks.q[...].sharding.shard_shape(model.blocks.q.shape)
    assert shard == (cfg.layers, cfg.embed // f, cfg.heads // t, cfg.head_dim)
    shard = model.blocks.down[...].sharding.shard_shape(model.blocks.down.shape)
    assert shard == (cfg.layers, cfg.mlp // t, cfg.embed // f)
    assert model.embed[...].sharding.shard_shape(model.embed.shape) == (cfg.vocab // t,
                                                                        cfg.embed // f)
    with jax.set_mesh(mesh):
        got = np.asarray(_forward(model, tokens, positions))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_padding_and_packing_equal_rows_alone(tiny_model, tiny_cfg):
    tokens, positions = _inputs(tiny_cfg, B=1, T=10, seed=2)
    a, b = tokens[:, :6], tokens[:, 6:]
    fa = np.asarray(_forward(tiny_model, a, positions[:, :6]))
    fb = np.asarray(_forward(tiny_model, b, positions[:, :4]))
    # right padding with mask: the valid part equals the row alone
    padded = jnp.concatenate([a, jnp.zeros((1, 4), jnp.int32)], 1)
    mask = jnp.arange(10)[None] < 6
    fp = nnx.jit(lambda m, t, p, k: m(t, p, mask=k)[0])(tiny_model, padded, positions, mask)
    np.testing.assert_allclose(np.asarray(fp)[:, :6], fa, rtol=1e-5, atol=1e-5)
    # packing two documents: segment ids + positions reset = each document alone
    seg = jnp.asarray([[1] * 6 + [2] * 4])
    pos = jnp.asarray([list(range(6)) + list(range(4))])
    fk = nnx.jit(lambda m, t, p, s: m(t, p, segment_ids=s)[0])(tiny_model, tokens, pos, seg)
    np.testing.assert_allclose(np.asarray(fk)[:, :6], fa, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fk)[:, 6:], fb, rtol=1e-5, atol=1e-5)
    # without segment ids the second document does see the first (the test can fail)
    assert np.abs(np.asarray(_forward(tiny_model, tokens, pos))[:, 6:] - fb).max() > 1e-3


def test_cached_forward_and_hidden_states(tiny_model, tiny_cfg):
    tokens, positions = _inputs(tiny_cfg, B=2, T=9)
    full = np.asarray(_forward(tiny_model, tokens, positions))
    cache = tiny_model.init_cache(2, 16)
    _, cache = tiny_model(tokens[:, :5], positions[:, :5], cache=cache)
    for t in range(5, 9):
        logits, cache = tiny_model(tokens[:, t:t + 1], positions[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == 9
    logits, _, hidden = tiny_model(tokens, positions, return_hidden=True)
    assert hidden.shape == (2, 9, tiny_cfg.embed)
    np.testing.assert_allclose(np.asarray(hidden @ tiny_model.embed[...].T), full, rtol=1e-4,
                               atol=1e-4)


def test_second_call_does_not_recompile(tiny_model, tiny_cfg):
    graphdef, state = nnx.split(tiny_model)
    f = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p)[0])
    tokens, positions = _inputs(tiny_cfg, B=2, T=8)
    f(state, tokens, positions)
    f(state, tokens + 1, positions)
    assert f._cache_size() == 1


def test_untied_bf16_and_experts_run():
    cfg = get_preset("tiny", tie_embeddings=False, dtype="bfloat16", expert_slots=2,
                     expert_rank=4)
    model = create_model(cfg)
    assert model.unembed.shape == (cfg.embed, cfg.vocab)
    assert model.blocks.q[...].dtype == jnp.float32  # fp32 params, bf16 compute
    tokens, positions = _inputs(cfg, B=2, T=5)
    logits, _ = model(tokens, positions)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("kw, needle", [
    ({"heads": 6, "kv_heads": 4}, "heads=6"),
    ({"head_dim": 15}, "head_dim=15"),
    ({"vocab": 0}, "vocab=0"),
    ({"attention": "flash"}, "'flash'"),
    ({"remat": "some"}, "'some'"),
])
def test_config_errors_name_the_value(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**kw)
    with pytest.raises(ValueError, match="'gpt5'"):
        get_preset("gpt5")
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
