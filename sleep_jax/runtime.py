"""Many processes: jax.distributed from flags or the environment, global batches, host reads.

Every command runs the same way on one process or many: ``initialize`` at entry (a no-op on one
process), the default mesh over all devices of all processes (``sleep_jax.mesh.make_mesh``, one
device order for every mesh shape), each process feeding only its rows of the global batch
(``process_rows`` + ``global_batch``), files written by process 0 only (``is_writer``), device
results read through ``host_read``.

Where the processes come from (``resolve``, first match wins; nothing found: one process):
  explicit   ``RuntimeConfig.num_processes > 1`` (flags ``--num_processes --process_id
             --coordinator_address``), or the environment of ``sleep-jax launch`` and the
             launch/ scripts: SLEEP_JAX_NUM_PROCESSES, SLEEP_JAX_COORDINATOR and a process id
             from SLEEP_JAX_PROCESS_ID, else the platform's own index: JOB_COMPLETION_INDEX
             (GKE JobSet / indexed Job), SLURM_PROCID, TPU_WORKER_ID;
  slurm      SLURM_JOB_ID with SLURM_NTASKS > 1: jax reads the job (no arguments);
  tpu        TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) naming two or more hosts (GKE TPU):
             jax reads it (no arguments);
  jax        ``distributed="jax"`` (flag ``--distributed=jax`` or SLEEP_JAX_DISTRIBUTED=jax):
             ``jax.distributed.initialize()`` with no arguments, e.g. on Cloud TPU VM pods,
             where jax asks the metadata server for the worker number and peers.
``distributed="none"`` forces one process. Already initialised: nothing is done.

``init_timeout_s`` (default 300, SLEEP_JAX_INIT_TIMEOUT) bounds the wait for the other
processes: when one never starts, each waiting process prints an error naming the coordinator,
itself and the count, and exits with status 3 (``INIT_TIMEOUT_EXIT``), not a hang and not
jax's own abort.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

ENV_NUM_PROCESSES = "SLEEP_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SLEEP_JAX_PROCESS_ID"
ENV_COORDINATOR = "SLEEP_JAX_COORDINATOR"
ENV_INIT_TIMEOUT = "SLEEP_JAX_INIT_TIMEOUT"
ENV_DISTRIBUTED = "SLEEP_JAX_DISTRIBUTED"
ENV_LOCAL_DEVICE_IDS = "SLEEP_JAX_LOCAL_DEVICE_IDS"
# The platforms' own per-worker index variables, in the order they are consulted.
INDEX_VARS = ("JOB_COMPLETION_INDEX", "SLURM_PROCID", "TPU_WORKER_ID")
DISTRIBUTED_MODES = ("auto", "none", "jax")
INIT_TIMEOUT_EXIT = 3  # exit status when the processes did not all connect in time


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How this process joins the others (per-process, so flags, not the run's config.json).

    distributed: "auto" (from the environment, see the module docstring), "none" (one
      process), "jax" (``jax.distributed.initialize()`` with no arguments).
    coordinator_address: "host:port" of process 0 ("" = from the environment).
    num_processes: 0 = from the environment.
    process_id: -1 = from the environment.
    local_device_ids: "0,1" = restrict this process to those local devices ("" = all).
    init_timeout_s: seconds to wait for all processes to connect (0 = from the environment,
      else 300).
    """

    distributed: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: str = ""
    init_timeout_s: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``initialize`` will do: kind is "single", "explicit", "slurm", "tpu" or "jax".

    For "slurm" and "tpu" the id and count are what jax will find (for logs and tests); jax is
    called without arguments then. None where unknown before jax asks (kind "jax").
    """

    kind: str
    num_processes: int | None = 1
    process_id: int | None = 0
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None
    init_timeout_s: int = 300


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _device_ids(text: str, where: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{where}={text!r}: local device ids are integers like '0,1'") from None


def resolve(cfg: RuntimeConfig | None = None, env: Mapping[str, str] | None = None) -> Plan:
    """The Plan for ``cfg`` in environment ``env`` (default ``os.environ``); starts nothing."""
    cfg = cfg or RuntimeConfig()
    env = os.environ if env is None else env
    mode = cfg.distributed if cfg.distributed != "auto" else env.get(ENV_DISTRIBUTED, "auto")
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed={mode!r}; allowed: {', '.join(DISTRIBUTED_MODES)}")
    timeout = cfg.init_timeout_s or (_int(env, ENV_INIT_TIMEOUT) if env.get(ENV_INIT_TIMEOUT)
                                     else 300)
    if timeout < 1:
        raise ValueError(f"init_timeout_s={timeout}: give a positive number of seconds")
    if mode == "none":
        return Plan("single", init_timeout_s=timeout)
    if mode == "jax":
        return Plan("jax", None, None, init_timeout_s=timeout)
    devices = (_device_ids(cfg.local_device_ids, "local_device_ids")
               or _device_ids(env.get(ENV_LOCAL_DEVICE_IDS, ""), ENV_LOCAL_DEVICE_IDS))
    count = cfg.num_processes or (_int(env, ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES)
                                  else 0)
    if count < 0:
        raise ValueError(f"num_processes={count}: give a positive count (0 = from the "
                         f"environment)")
    if count > 1:
        pid = cfg.process_id
        if pid < 0:
            for name in (ENV_PROCESS_ID, *INDEX_VARS):
                if env.get(name, "") != "":
                    pid = _int(env, name)
                    break
            else:
                raise ValueError(f"{count} processes but no process id: set --process_id, "
                                 f"{ENV_PROCESS_ID} or one of {', '.join(INDEX_VARS)}")
        if not 0 <= pid < count:
            raise ValueError(f"process id {pid} is outside [0, {count}) for {count} processes")
        addr = cfg.coordinator_address or env.get(ENV_COORDINATOR) or \
            env.get("JAX_COORDINATOR_ADDRESS")
        if not addr:
            raise ValueError(f"{count} processes but no coordinator address: set "
                             f"--coordinator_address or {ENV_COORDINATOR} to host:port of "
                             f"process 0")
        if ":" not in addr:
            raise ValueError(f"coordinator address {addr!r} must look like host:port")
        return Plan("explicit", count, pid, addr, devices, timeout)
    if count == 1:
        return Plan("single", init_timeout_s=timeout)
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS") and _int(env, "SLURM_NTASKS") > 1:
        pid = _int(env, "SLURM_PROCID") if env.get("SLURM_PROCID") else None
        return Plan("slurm", _int(env, "SLURM_NTASKS"), pid, local_device_ids=devices,
                    init_timeout_s=timeout)
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    hosts = [h.strip() for h in hosts.split(",") if h.strip()]
    # off a TPU VM, jax's libtpu start-up stores its warning ("WARNING: could not determine
    # TPU worker hostnames or IP addresses, please set ...") in TPU_WORKER_HOSTNAMES: a value
    # with spaces names no hosts
    if len(hosts) > 1 and not any(" " in h for h in hosts):
        pid = _int(env, "TPU_WORKER_ID") if env.get("TPU_WORKER_ID") else None
        return Plan("tpu", len(hosts), pid, init_timeout_s=timeout)
    return Plan("single", init_timeout_s=timeout)


def initialize(cfg: RuntimeConfig | None = None, env: Mapping[str, str] | None = None) -> Plan:
    """Join the other processes (``jax.distributed.initialize``) when there are any.

    Call before anything touches a device. A no-op on one process and when jax.distributed is
    already initialised. When the processes do not all connect within ``init_timeout_s`` the
    process prints an error naming the coordinator, itself and the timeout and exits with
    ``INIT_TIMEOUT_EXIT`` (the wait is inside XLA, which cannot be interrupted); an error jax
    raises is re-raised as RuntimeError with the same text.
    """
    plan = resolve(cfg, env)
    if plan.kind == "single" or jax.distributed.is_initialized():
        return plan
    # jax's own timeout ends in a C++ abort (a stack dump, exit 134); ours fires first, says
    # what is missing and exits with INIT_TIMEOUT_EXIT. The wait releases the GIL.
    kwargs = dict(initialization_timeout=plan.init_timeout_s + 30)
    if plan.kind == "explicit":
        # everything is given: jax must not fill local devices from a cluster it detects
        kwargs.update(coordinator_address=plan.coordinator_address,
                      num_processes=plan.num_processes, process_id=plan.process_id,
                      local_device_ids=list(plan.local_device_ids or ()) or None,
                      cluster_detection_method="deactivate")
    elif plan.local_device_ids:
        kwargs["local_device_ids"] = list(plan.local_device_ids)
    who = (f"process {plan.process_id} of {plan.num_processes}" if plan.num_processes
           else "this process")
    what = (f"jax.distributed ({plan.kind}): {who} could not join the others through the "
            f"coordinator {plan.coordinator_address or '(detected by jax)'} within "
            f"{plan.init_timeout_s} s: did every process start (same command, same "
            f"coordinator, ids 0..N-1)? Raise the wait with --init_timeout_s or "
            f"{ENV_INIT_TIMEOUT}.")

    def give_up():
        sys.stderr.write(f"error: {what}\n")
        sys.stderr.flush()
        os._exit(INIT_TIMEOUT_EXIT)

    log.info("jax.distributed (%s): %s, coordinator %s, timeout %d s", plan.kind, who,
             plan.coordinator_address or "(detected)", plan.init_timeout_s)
    watchdog = threading.Timer(plan.init_timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the XLA client raises its own status types
        if "before any JAX calls" in str(e):
            raise RuntimeError(f"runtime.initialize must run before anything touches a device "
                               f"(jax.devices(), an array, a jit): {e}") from e
        raise RuntimeError(f"{what} ({type(e).__name__}: {str(e).strip()[:300]})") from e
    finally:
        watchdog.cancel()
    return dataclasses.replace(plan, num_processes=jax.process_count(),
                               process_id=jax.process_index())


def is_writer() -> bool:
    """True on the process that writes files (reports, metrics, logs): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here for the others (no-op on one process): after process 0 wrote
    a file that the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------ batches


def _sharding(mesh: Mesh, spec) -> NamedSharding:
    if isinstance(spec, NamedSharding):
        return spec
    return NamedSharding(mesh, spec if isinstance(spec, PartitionSpec) else PartitionSpec(spec))


def process_rows(global_rows: int, mesh: Mesh, spec, ndim: int = 2) -> np.ndarray:
    """Indices of the rows of a [global_rows, ...] batch that this process feeds, in order.

    The rows on this process's devices under ``spec`` (a PartitionSpec, or a NamedSharding),
    in the order ``jax.make_array_from_process_local_data`` expects them (the distinct row
    blocks of the local devices, sorted by start). All rows on one process.
    """
    sh = _sharding(mesh, spec)
    shape = (global_rows,) + (1,) * (ndim - 1)
    starts = sorted({(idx[0].start or 0) for idx in
                     sh.addressable_devices_indices_map(shape).values()})
    block = sh.shard_shape(shape)[0]
    return np.concatenate([np.arange(s, s + block) for s in starts]).astype(np.int64)


def global_batch(local_rows, mesh: Mesh, spec, global_rows: int | None = None):
    """A global jax.Array (or a dict of them) from this process's rows.

    Args:
      local_rows: a [B_local, ...] numpy array or a dict of them: this process's rows of the
        global batch, as ``process_rows`` lists them (on one process: the whole batch).
      mesh: the mesh; spec: the PartitionSpec (or NamedSharding) of the global batch.
      global_rows: B, the global batch size (default B_local x process count).
    Returns:
      The same structure of [B, ...] arrays sharded by ``spec``.
    """
    sh = _sharding(mesh, spec)
    rows = global_rows
    if rows is None:
        first = next(iter(local_rows.values())) if isinstance(local_rows, dict) else local_rows
        rows = first.shape[0] * jax.process_count()

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sh, x, (rows,) + x.shape[1:] if jax.process_count() > 1 else None)

    if isinstance(local_rows, dict):
        return {k: one(v) for k, v in local_rows.items()}
    return one(local_rows)


def host_read(tree):
    """A pytree of device arrays as numpy, also when arrays span processes.

    A fully addressable or fully replicated array is read locally; any other (a sharded array
    over several processes' devices) is gathered with ``multihost_utils.process_allgather``,
    which is a collective: every process must call ``host_read`` on the same arrays in the
    same order. Non-array leaves are returned as they are.
    """
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    local = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
             and (x.is_fully_addressable or x.is_fully_replicated)]
    out = list(leaves)
    for i, v in zip(local, jax.device_get([leaves[i] for i in local])):  # one transfer
        out[i] = np.asarray(v)
    done = set(local)
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array) and i not in done:
            out[i] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.unflatten(treedef, out)


def shard_batch(batch: dict, mesh: Mesh, spec) -> dict:
    """A global batch (dict of [B, ...] numpy arrays, the same on every process) as global
    jax.Arrays, this process feeding only its ``process_rows`` of it."""
    b = next(iter(batch.values())).shape[0]
    rows = process_rows(b, mesh, spec)
    if len(rows) == b:
        return global_batch(dict(batch), mesh, spec, b)
    return global_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh, spec, b)


def shard_rows(tree, mesh: Mesh, rules=None):
    """A pytree of [B, ...] host arrays (one global batch, the same on every process, e.g. a
    ``seeding.SeedingBatch``) as global jax.Arrays with B over the mesh's batch axes
    (``mesh.batch_sharding``; a B they do not divide is replicated), this process placing only
    its ``process_rows``. jax.Array leaves (already placed) and 0-d leaves are kept as they are.
    """
    from sleep_jax.mesh import RULES, batch_sharding

    def one(x):
        if isinstance(x, jax.Array) or np.ndim(x) == 0:
            return x
        x = np.asarray(x)
        b = x.shape[0]
        sh = batch_sharding(mesh, x.ndim, b, RULES if rules is None else rules)
        rows = process_rows(b, mesh, sh, x.ndim)
        return global_batch(x if len(rows) == b else x[rows], mesh, sh, b)

    return jax.tree.map(one, tree)


class ShardedBatches:
    """An iterator of global batches over ``it`` (global numpy batches, computed alike on
    every process), each process feeding only its rows (``shard_batch``).

    The position is ``it``'s ``get_state()`` (JSON), the same on every process, so a run saved
    by N processes resumes on any other count. Every process reads and tokenizes all of the
    data (host work grows with the process count; device input does not).
    """

    def __init__(self, it, mesh: Mesh, spec):
        self.it, self.mesh, self.spec = it, mesh, spec

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return shard_batch(next(self.it), self.mesh, self.spec)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state) -> None:
        self.it.set_state(state)
