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
