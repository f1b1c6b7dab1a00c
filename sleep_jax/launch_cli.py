"""``sleep-jax launch``: run one command as N processes on this machine, like a pod would.

  sleep-jax launch --nproc 2 [--devices-per-process 4] -- sleep-jax train --workdir runs/x

Each process gets the environment ``sleep_jax.runtime.initialize`` reads: SLEEP_JAX_NUM_PROCESSES,
SLEEP_JAX_COORDINATOR (127.0.0.1 on a free port) and its rank in SLEEP_JAX_PROCESS_ID (or in the
variable ``--rank-env`` names, e.g. TPU_WORKER_ID, SLURM_PROCID or JOB_COMPLETION_INDEX, to run
a launch/ script's per-worker command the way its platform would). ``--devices-per-process K``
sets JAX_NUM_CPU_DEVICES=K (fake CPU devices; it takes precedence over XLA_FLAGS'
--xla_force_host_platform_device_count) and SLEEP_JAX_LOCAL_DEVICE_IDS to the rank's K devices
(rank*K ... rank*K+K-1: on a GPU machine each process gets its own GPUs). Output lines are
prefixed with ``[rank]``. When a process fails, the others are stopped (SIGTERM, then SIGKILL
after ``--grace-s``) and the launcher exits with the failed process's status, naming it. A
SIGTERM to the launcher is passed to every process (training saves a checkpoint and stops).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from sleep_jax.runtime import (
    ENV_COORDINATOR,
    ENV_INIT_TIMEOUT,
    ENV_LOCAL_DEVICE_IDS,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, nproc: int, coordinator: str, *, devices_per_process: int = 0,
                rank_env: str = ENV_PROCESS_ID, init_timeout_s: int = 0,
                base: dict | None = None) -> dict:
    """The environment of process ``rank`` of ``nproc`` (a copy of ``base``, default os.environ)."""
    env = dict(os.environ if base is None else base)
    env[ENV_NUM_PROCESSES] = str(nproc)
    env[ENV_COORDINATOR] = coordinator
    env.pop(ENV_PROCESS_ID, None)
    env[rank_env] = str(rank)
    env["PYTHONUNBUFFERED"] = "1"
    if devices_per_process:
        k = devices_per_process
        env["JAX_NUM_CPU_DEVICES"] = str(k)
        env[ENV_LOCAL_DEVICE_IDS] = ",".join(str(rank * k + i) for i in range(k))
    if init_timeout_s:
        env[ENV_INIT_TIMEOUT] = str(init_timeout_s)
    return env


def _pump(rank: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
            sys.stdout.flush()
    stream.close()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the child leads its own session: its children go too
    except (ProcessLookupError, PermissionError):
        pass


def launch(command: list[str], nproc: int, *, devices_per_process: int = 0,
           rank_env: str = ENV_PROCESS_ID, port: int = 0, init_timeout_s: int = 0,
           grace_s: float = 5.0) -> int:
    """Run ``command`` as ``nproc`` processes; 0 when all succeed, else the first failure's
    status (1 for a death by signal), after stopping the others. A SIGTERM to the launcher is
    passed to every process (a training run then saves a checkpoint at one step on all of
    them and stops), and the launcher waits for them."""
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs, pumps = [], []
    forwarded = []

    def on_term(signum, frame):  # a scheduler stops the launcher: every process saves, stops
        if not forwarded:
            forwarded.append(True)
            print("sleep-jax launch: SIGTERM: passed to every process", file=sys.stderr)
            for q in procs:
                if q.poll() is None:
                    _signal_group(q, signal.SIGTERM)

    prev = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, on_term)
    try:
        return _run(command, nproc, procs, pumps, lock, coordinator, devices_per_process,
                    rank_env, init_timeout_s, grace_s)
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _run(command, nproc, procs, pumps, lock, coordinator, devices_per_process, rank_env,
         init_timeout_s, grace_s) -> int:
    for rank in range(nproc):
        env = process_env(rank, nproc, coordinator, devices_per_process=devices_per_process,
                          rank_env=rank_env, init_timeout_s=init_timeout_s)
        try:
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 start_new_session=True)
        except OSError as e:
            for q in procs:
                _signal_group(q, signal.SIGKILL)
            print(f"sleep-jax launch: cannot start {command[0]!r}: {e}", file=sys.stderr)
            return 127
        procs.append(p)
        t = threading.Thread(target=_pump, args=(rank, p.stdout, lock), daemon=True)
        t.start()
        pumps.append(t)
    failed = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failed = rank
                    break
            else:
                time.sleep(0.05)
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.returncode), None)
    except KeyboardInterrupt:
        failed = -1
    if failed is not None:
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
    for t in pumps:
        t.join(timeout=2)
    if failed is None:
        return 0
    if failed == -1:
        print("sleep-jax launch: interrupted; stopped all processes", file=sys.stderr)
        return 130
    code = procs[failed].returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    print(f"sleep-jax launch: process {failed} of {nproc} {how}; stopped the others "
          f"({' '.join(command)})", file=sys.stderr)
    return code if code > 0 else 1


def main(argv: list[str]) -> int:
    """Entry point of ``sleep-jax launch``."""
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="sleep-jax launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, required=True, help="number of processes")
    ap.add_argument("--devices-per-process", type=int, default=0,
                    help="fake CPU devices per process (JAX_NUM_CPU_DEVICES; 0: leave as is)")
    ap.add_argument("--rank-env", default=ENV_PROCESS_ID,
                    help="variable that carries the rank (e.g. TPU_WORKER_ID, SLURM_PROCID, "
                         "JOB_COMPLETION_INDEX)")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    ap.add_argument("--init-timeout-s", type=int, default=0,
                    help=f"seconds to wait for all processes to connect ({ENV_INIT_TIMEOUT}; "
                         f"0: the runtime's default, 300)")
    ap.add_argument("--grace-s", type=float, default=5.0,
                    help="seconds between SIGTERM and SIGKILL when stopping the others")
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="the command (after --, or after the options)")
    args = ap.parse_args(argv)
    rest = rest or args.command
    if args.nproc < 1:
        ap.error(f"--nproc {args.nproc}: give a positive number of processes")
    if args.devices_per_process < 0:
        ap.error(f"--devices-per-process {args.devices_per_process}: give 0 or more")
    if not rest:
        ap.error("no command: sleep-jax launch --nproc N -- <command ...>")
    return launch(rest, args.nproc, devices_per_process=args.devices_per_process,
                  rank_env=args.rank_env, port=args.port, init_timeout_s=args.init_timeout_s,
                  grace_s=args.grace_s)


def devices_main(argv: list[str]) -> int:
    """``sleep-jax devices``: join the other processes and print one JSON line per process
    (process, processes, devices, local devices, how it joined, a sum over all devices and an
    all-gather of each device's process id, both needing every process), to check a pod's
    wiring with the same entry point as a run."""
    import json

    from sleep_jax.runtime import RuntimeConfig, initialize

    ap = argparse.ArgumentParser(prog="sleep-jax devices", description=devices_main.__doc__)
    ap.add_argument("--init_timeout_s", type=int, default=0)
    args = ap.parse_args(argv)
    plan = initialize(RuntimeConfig(init_timeout_s=args.init_timeout_s))
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec

    from sleep_jax.mesh import make_mesh
    from sleep_jax.runtime import global_batch, host_read

    mesh = make_mesh("data=-1")
    n = len(jax.local_devices())
    ids = global_batch(np.full((n,), jax.process_index(), np.int32), mesh, PartitionSpec("data"),
                       len(jax.devices()))
    total = int(host_read(jax.jit(lambda x: x.sum())(ids)))
    gathered = host_read(ids).tolist()  # spans the processes: an all-gather
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": len(jax.devices()), "local_devices": n, "kind": plan.kind,
                      "platform": jax.devices()[0].platform, "sum_of_process_ids": total,
                      "process_of_each_device": gathered}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
