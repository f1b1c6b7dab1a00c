"""The launch/ scripts: each dry run prints its platform commands, and its per-worker command
runs as 2 processes through the local launcher with the variables that platform sets (TPU
worker id, the JobSet's JOB_COMPLETION_INDEX, Slurm's SLURM_* with jax's own detection).

``sleep-jax devices`` is the command: it joins the processes, sums every process's id over all
devices and all-gathers them (``runtime.host_read`` of an array spanning the processes), so a
wrong id, count or coordinator fails or gives a wrong sum.
"""

import json
import os
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
PY = sys.executable


def _free_port(lo=20000, hi=60000) -> int:
    for port in range(lo, hi, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
               PATH=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))
    for k in ("SLEEP_JAX_NUM_PROCESSES", "SLEEP_JAX_PROCESS_ID", "SLEEP_JAX_COORDINATOR"):
        env.pop(k, None)
    env.update(extra)
    return env


def _script(name, *args):
    p = subprocess.run(["bash", os.path.join(LAUNCH, name), *args], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert p.returncode == 0, p.stderr
    return p.stdout


def _launch(rank_env, command, env, port=0):
    p = subprocess.run([PY, "-m", "sleep_jax.cli", "launch", "--nproc", "2", "--rank-env",
                        rank_env, "--init-timeout-s", "60", "--port", str(port), "--",
                        *command], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = sorted((json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines()
                   if '"sum_of_process_ids"' in line), key=lambda r: r["process"])
    assert [(r["process"], r["processes"], r["sum_of_process_ids"]) for r in recs] == \
        [(0, 2, 1), (1, 2, 1)], p.stdout[-3000:]
    assert all(r["process_of_each_device"] == [0, 1] for r in recs)  # host_read's all-gather
    return recs


def _worker_command(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("worker-command: ")]
    assert len(lines) == 1, out
    return lines[0][len("worker-command: "):]


def test_tpu_pod_script(tmp_path):
    port = _free_port()
    out = _script("tpu_pod.sh", "--tpu", "t1", "--zone", "us-central2-b", "--workers", "2",
                  "--coordinator", "127.0.0.1", "--port", str(port), "--dir", ROOT,
                  "--dry-run", "--", "sleep-jax", "devices")
    assert "tpu-vm describe t1 --zone us-central2-b || gcloud compute tpus tpu-vm create t1" \
        in out
    assert out.count("--worker=all") == 2 and "fuser -k" in out and "pip install -q -c" in out
    cmd = _worker_command(out)
    assert "TPU_WORKER_ID=$TPU_WORKER_ID" in cmd and f"127.0.0.1:{port}" in cmd
    # the launcher's own coordinator differs: the script's variables are the ones used
    recs = _launch("TPU_WORKER_ID", ["bash", "-c", cmd], _env(), port=_free_port(port + 1))
    assert all(r["kind"] == "explicit" for r in recs)


def test_gke_jobset_manifest():
    out = _script("gke_jobset.sh", "--name", "sj", "--image", "gcr.io/p/sleep-jax:1",
                  "--workers", "2", "--topology", "2x4", "--dry-run", "--", "sleep-jax",
                  "devices")
    doc = next(yaml.safe_load_all(out.split("# kubectl apply")[0]))
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "sj"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (2, 2, "Indexed")
    pod = job["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SLEEP_JAX_COORDINATOR"] == "sj-slice-0-0.sj:8476"  # pod 0 of the JobSet
    assert c["command"] == ["sleep-jax", "devices"] and env["SLEEP_JAX_NUM_PROCESSES"] == "2"
    # Kubernetes sets JOB_COMPLETION_INDEX in each pod; pod 0's DNS name is local here.
    port = _free_port()
    env["SLEEP_JAX_COORDINATOR"] = f"127.0.0.1:{port}"
    cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *c["command"]]
    _launch("JOB_COMPLETION_INDEX", cmd, _env(), port=_free_port(port + 1))


def test_slurm_script_uses_jax_detection():
    out = _script("slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                  "--dry-run", "--", "sleep-jax", "devices")
    assert "sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --partition=gpu" in out
    assert "slurm.sbatch sleep-jax devices" in out
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
        assert 'srun --kill-on-bad-exit=1 --output="logs/%x-%j/worker-%t.log" "$@"' in f.read()
    cmd = shlex.split(_worker_command(out))
    # What srun sets on each task; jax reads it (coordinator port from the job id).
    port = _free_port(61440, 65535)
    env = _env(SLURM_JOB_ID=str(port - 61440), SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost",
               SLURM_LOCALID="0")
    recs = _launch("SLURM_PROCID", ["env", "-u", "SLEEP_JAX_NUM_PROCESSES", "-u",
                                    "SLEEP_JAX_COORDINATOR", *cmd], env)
    assert all(r["kind"] == "slurm" for r in recs)


@pytest.mark.parametrize("name", ["tpu_pod.sh", "gke_jobset.sh", "slurm.sh"])
def test_scripts_refuse_a_command_that_is_not_sleep_jax(name):
    p = subprocess.run(["bash", os.path.join(LAUNCH, name), "--dry-run", "--", "python", "x"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "must start with sleep-jax" in p.stderr
