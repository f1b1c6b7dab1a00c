"""Device meshes from named axes, and the logical-axis -> mesh-axis rules table.

A mesh is written by name, e.g. ``"data=2,tensor=4"`` or ``{"fsdp": -1}``. The three axes
``data``, ``fsdp`` and ``tensor`` always exist (size 1 when not named) so the same rules table
works on every layout. Parameters carry logical axis names (``embed``, ``mlp``, ``heads``...);
``RULES`` maps each logical name to a mesh axis. A model dimension that its mesh axis does not
divide (SmolLM2 has 9 heads) is replicated on that axis, and this is reported once per
(name, size, axis). ``tree_shardings`` is the one walk from variables' logical names to
NamedShardings, for a model, an nnx.State, an optimizer state or a whole train state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated). Config data: a
# config may pass its own table. Batch is split over data and fsdp (FSDP is data parallel on
# activations); parameters are split over fsdp on `embed` and over tensor on the wide axes.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("expert", None),
    ("expert_rank", None),
    ("router", None),
)

_reported: set[tuple] = set()


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """Parse ``"data=2,tensor=4"`` (or a mapping) into {axis: size}; unnamed axes get 1."""
    if spec is None or spec == "":
        spec = {"fsdp": -1}
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"mesh entry {part!r} in {spec!r} must look like name=size, "
                                 f"e.g. 'data=2,tensor=4'")
            name, size = (s.strip() for s in part.split("=", 1))
            try:
                items[name] = int(size)
            except ValueError:
                raise ValueError(f"mesh axis {name!r} has size {size!r}: sizes are integers "
                                 f"(or -1 to fill from the device count)") from None
        spec = items
    out = {a: 1 for a in MESH_AXES}
    for name, size in spec.items():
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; allowed: {', '.join(MESH_AXES)}")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}: use a positive integer or -1")
        out[name] = size
    return out


def resolve_mesh_shape(spec, n_devices: int) -> dict[str, int]:
    """Fill the one -1 axis from the device count and check the product."""
    shape = parse_mesh(spec)
    auto = [a for a, s in shape.items() if s == -1]
    if len(auto) > 1:
        raise ValueError(f"mesh {spec!r} has two or more -1 axes ({', '.join(auto)}); "
                         f"at most one axis may be -1")
    known = math.prod(s for s in shape.values() if s != -1)
    if auto:
        if n_devices % known:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices are not divisible by the fixed "
                             f"axes' product {known}")
        shape[auto[0]] = n_devices // known
    if math.prod(shape.values()) != n_devices:
        raise ValueError(f"mesh {spec!r} has {math.prod(shape.values())} devices in all "
                         f"({shape}) but {n_devices} devices are available; the product of the "
                         f"axis sizes must equal the device count (or use -1 for one axis)")
    return shape


def device_order() -> list:
    """All devices of all processes in the one order every default mesh reshapes.

    Process-major: each process's devices form one contiguous block (in jax's id order), so the
    leading mesh axes split across hosts, the inner axes stay within a host, and each process
    holds contiguous rows of a batch. One order for every mesh shape: a jit given arrays on two
    meshes of different shapes sees compatible devices (orders from mesh_utils per shape are
    not). mesh_utils' flat topology order was measured and not used: on v5e:4x4 (4 hosts) it
    snakes across hosts (processes 0,0,1,1,1,1,0,2,3,3,3,3,2,2,2,0; docs/LOG.md).
    """
    devices = jax.devices()
    return sorted(devices, key=lambda d: d.process_index)  # stable: id order within a process


def make_mesh(spec=None, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all, in ``device_order()``) with axes data, fsdp,
    tensor, all Auto.

    The device array is the flat order reshaped to (data, fsdp, tensor), so every mesh over
    the same devices shares one order. Auto axis types let ``with_sharding_constraint`` and
    GSPMD propagation work the same on jax 0.10 (whose ``make_mesh`` defaults to Explicit
    axes) and 0.11.
    """
    devices = list(device_order() if devices is None else devices)
    shape = resolve_mesh_shape(spec, len(devices))
    arr = np.asarray(devices, dtype=object).reshape([shape[a] for a in MESH_AXES])
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(arr, MESH_AXES, axis_types=auto)


def run_mesh(spec, n_devices: int = 0) -> Mesh:
    """A command's mesh: ``spec`` over every device of every process (``n_devices`` 0), or over
    the first ``n_devices`` in ``device_order()`` (one process only: tests and one-device
    figures on a host with more).

    Raises:
      ValueError: ``n_devices`` out of range, a subset on many processes, a spec that does not
        fit the devices.
    """
    devices = device_order()
    if n_devices:
        if not 1 <= n_devices <= len(devices):
            raise ValueError(f"devices={n_devices}: this run has {len(devices)} devices "
                             f"(0 = all)")
        if jax.process_count() > 1 and n_devices != len(devices):
            raise ValueError(f"devices={n_devices}: with {jax.process_count()} processes the "
                             f"mesh spans all {len(devices)} devices (set 0)")
        devices = devices[:n_devices]
    return make_mesh(spec, devices=devices)


def mesh_name(mesh: Mesh) -> str:
    """``data=2,fsdp=4,tensor=1`` for a mesh (used in benchmark tables)."""
    return ",".join(f"{a}={s}" for a, s in mesh.shape.items())


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> PartitionSpec:
    """PartitionSpec for an array with logical axis ``names`` and ``shape`` on ``mesh``.

    A dimension whose mesh axes do not divide it is replicated (reported once); a mesh axis is
    used at most once per array (the first logical axis that claims it gets it).
    """
    table = dict(rules)
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if axes and dim % size:
            key = (name, dim, axes)
            if key not in _reported:
                _reported.add(key)
                log.warning("logical axis %r of size %d is not divisible by mesh axes %s "
                            "(size %d): replicated on them", name, dim, axes, size)
            axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


def tree_shardings(tree, mesh: Mesh, rules=RULES, *, strict: bool = False):
    """NamedShardings for any pytree, by the logical names of its NNX variables.

    An ``nnx.Module`` is read as its ``nnx.state``. Each ``nnx.Variable`` (concrete or abstract)
    with ``logical_axes`` metadata gets the sharding of ``logical_to_spec`` for its own shape;
    a variable without names, and every other leaf (optimizer counters, the step), is
    replicated. A variable whose value's rank differs from its names (a scalar mask, a factored
    moment) is replicated, or raises with ``strict=True`` (model parameters must match).
    Returns the same structure with NamedSharding values (variables keep their type, so the
    result is usable as ``in/out_shardings`` of ``jax.jit`` and for ``jax.device_put``).
    """
    from flax import nnx

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    replicated = NamedSharding(mesh, PartitionSpec())
    is_var = lambda x: isinstance(x, nnx.Variable)

    def one(v):
        if not is_var(v):
            return replicated
        names = v.get_metadata().get("logical_axes")
        shape = tuple(v.shape)
        if names is None or (len(names) != len(shape) and not strict):
            return v.replace(replicated)
        return v.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)))

    return jax.tree.map(one, tree, is_leaf=is_var)


def rule_axes(name: str, mesh, rules=RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1 on ``mesh``) that logical axis ``name`` maps to."""
    table = dict(rules)
    if name not in table:
        raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = table[name]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def batch_spec(mesh, shape: Sequence[int], rules=RULES) -> PartitionSpec | None:
    """PartitionSpec splitting dim 0 of a [B, ...] activation over the ``batch`` rule's axes.

    ``mesh`` may be abstract (``jax.sharding.get_abstract_mesh()``). None when those axes are
    all size 1 on the mesh or do not divide B (leave the array unconstrained then).
    """
    axes = rule_axes("batch", mesh, rules)
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or shape[0] % size:
        return None
    return PartitionSpec(axes, *([None] * (len(shape) - 1)))


def named_sharding(names, shape, mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, batch: int | None = None, rules=RULES) -> NamedSharding:
    """Sharding of a [B, ...] data array: B over the `batch` rule, the rest replicated."""
    shape = (batch if batch is not None else math.prod(mesh.shape.values()),) + (1,) * (ndim - 1)
    return named_sharding(("batch",) + (None,) * (ndim - 1), shape, mesh, rules)
