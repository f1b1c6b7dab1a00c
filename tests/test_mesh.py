"""Mesh construction and the logical -> mesh rules."""

import logging

import jax
import pytest
from jax.sharding import PartitionSpec as P

from sleep_jax import mesh as meshlib


def test_named_mesh_and_fill():
    m = meshlib.make_mesh("data=2,tensor=-1")
    assert dict(m.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert meshlib.mesh_name(m) == "data=2,fsdp=1,tensor=4"
    assert dict(meshlib.make_mesh({"fsdp": 8}).shape)["fsdp"] == 8
    assert dict(meshlib.make_mesh(None).shape)["fsdp"] == 8


@pytest.mark.parametrize("spec, needle", [
    ("data=3", "3 devices in all"),
    ("data=-1,fsdp=-1", "two or more -1 axes"),
    ("pipeline=2,data=4", "unknown mesh axis 'pipeline'"),
    ("data=two", "'two'"),
    ("data", "name=size"),
    ("data=0,fsdp=-1", "size 0"),
])
def test_mesh_errors_name_the_value(spec, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        meshlib.make_mesh(spec)


def test_rules_shard_and_replicate_non_divisible(caplog):
    m = meshlib.make_mesh("fsdp=2,tensor=4")
    assert meshlib.logical_to_spec(("embed", "mlp"), (64, 128), m) == P("fsdp", "tensor")
    assert meshlib.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 8, 16),
                                   m) == P(None, "fsdp", "tensor", None)
    meshlib._reported.clear()
    with caplog.at_level(logging.WARNING, logger="sleep_jax.mesh"):
        # SmolLM2: 9 heads on tensor=4 -> replicated, reported once.
        for _ in range(3):
            spec = meshlib.logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), m)
    assert spec == P("fsdp", None, None)
    msgs = [r.getMessage() for r in caplog.records if "'heads'" in r.getMessage()]
    assert len(msgs) == 1 and "9" in msgs[0]
    # batch is split over data and fsdp together
    m2 = meshlib.make_mesh("data=2,fsdp=4")
    assert meshlib.logical_to_spec(("batch", None), (16, 5), m2) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'nope'"):
        meshlib.logical_to_spec(("nope",), (4,), m2)


def test_tree_shardings_one_walk_for_models_states_and_optimizers():
    """Variables by their own names and shapes (hand-written specs), everything else
    replicated; a rank mismatch is replicated or, strict, an error naming the names."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    m = meshlib.make_mesh("fsdp=2,tensor=4")

    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((8, 12)), logical_axes=("embed", "mlp"))
            self.n = nnx.Param(jnp.ones((8,)), logical_axes=("embed",))
            self.free = nnx.Param(jnp.zeros((3,)))  # no names: replicated
            self.h = nnx.Param(jnp.zeros((8, 9)), logical_axes=("embed", "heads"))  # 9 % 4

    model = Tiny()
    want = {"w": P("fsdp", "tensor"), "n": P("fsdp"), "free": P(), "h": P("fsdp", None)}
    sh = meshlib.tree_shardings(model, m)
    for k, spec in want.items():
        assert sh[k].get_value().spec == spec and sh[k].get_value().mesh == m, k
    params = nnx.state(model, nnx.Param)
    opt = optax.adam(1e-3).init(params)
    osh = meshlib.tree_shardings(opt, m)
    for k, spec in want.items():  # moments follow the parameters' names
        assert osh[0].mu[k].get_value().spec == spec, k
        assert osh[0].nu[k].get_value().spec == spec, k
    assert osh[0].count.spec == P()  # the counter is replicated
    abstract = jax.eval_shape(lambda: params)  # abstract states work the same
    assert meshlib.tree_shardings(abstract, m)["w"].get_value().spec == P("fsdp", "tensor")
    bad = nnx.Param(jnp.zeros(()), logical_axes=("embed", "mlp"))  # a scalar mask
    assert meshlib.tree_shardings({"m": bad}, m)["m"].get_value().spec == P()
    with pytest.raises(ValueError, match=r"\('embed', 'mlp'\) do not match shape \(\)"):
        meshlib.tree_shardings({"m": bad}, m, strict=True)


@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "data=8", "fsdp=8", "tensor=8",
                                  "data=2,tensor=4", "data=2,fsdp=2,tensor=2"])
@pytest.mark.parametrize("batch", [8, 6, 2, 1])
def test_batch_spec_follows_the_batch_rule(spec, batch):
    """batch_spec == the formula the model used to hard-code (data, fsdp), on concrete and
    abstract meshes; a custom rule moves it."""
    m = meshlib.make_mesh(spec)
    axes = tuple(a for a in ("data", "fsdp") if m.shape[a] > 1)
    size = 1
    for a in axes:
        size *= m.shape[a]
    want = None if not axes or batch % size else P(axes, None, None)
    assert meshlib.batch_spec(m, (batch, 5, 3)) == want
    assert meshlib.batch_spec(m.abstract_mesh, (batch, 5, 3)) == want
    rules = (("batch", "tensor"),)
    t = m.shape["tensor"]
    assert meshlib.batch_spec(m, (batch, 5), rules) == (
        None if t == 1 or batch % t else P(("tensor",), None))


def test_rule_axes_errors_name_the_axis():
    with pytest.raises(ValueError, match="'bogus' has no rule"):
        meshlib.rule_axes("bogus", meshlib.make_mesh("fsdp=8"))


def test_run_mesh_spans_every_device_or_the_first_n():
    from sleep_jax.mesh import device_order, run_mesh

    n = len(jax.devices())
    assert run_mesh("fsdp=-1").devices.size == n
    two = run_mesh("fsdp=-1", 2)
    assert list(two.devices.flat) == device_order()[:2] and two.shape["fsdp"] == 2
    with pytest.raises(ValueError, match=f"devices={n + 1}: this run has {n} devices"):
        run_mesh("fsdp=-1", n + 1)
    with pytest.raises(ValueError):
        run_mesh("fsdp=4", 2)  # the spec does not fit the chosen devices
