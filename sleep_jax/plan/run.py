"""A mesh plan: every step compiled for every mesh of a TPU topology, one table of figures.

``run_plan(PlanConfig)`` compiles the steps (``steps.py``) on a topology's devices
(``jax.experimental.topologies``: libtpu compiles for TPU on this CPU host; nothing runs and
nothing is allocated) and returns one JSON-able dict: per mesh and step the per-chip memory
(arguments, outputs, temporaries) against the chip's HBM (``fits``), FLOPs and bytes accessed,
each collective's count and bytes, the while loops left, and the roofline estimate

    step_s = max(flops / peak, bytes accessed / HBM bandwidth, collective bytes / ICI bandwidth)

per chip (``chips.roofline``; all-reduce bytes count twice: a ring all-reduce is a
reduce-scatter plus an all-gather). The train step also reports its model FLOPs
(``models.config.flops_per_token``, 6N + 12LDT) and the MFU the estimate implies. The best mesh
is the one with the lowest estimated step time for the first planned step among the meshes where
that step fits (``best_by_step`` for every step). With ``measure`` the same steps are timed on
the host's CPU devices (8 fake devices in the tests), labelled as CPU: a check that the
programs run, not a prediction of TPU time.
"""

from __future__ import annotations

import dataclasses
import os
import time

from sleep_jax.plan import chips as chips_mod
from sleep_jax.plan import steps as steps_mod

TARGETS = ("base", "grown")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What ``sleep-jax plan`` compiles (configs/plan.py sets every field).

    topology: a TPU topology name (``v5e:16x16``, ``v4:2x2x2``, ``v5p:2x2x4``, ``v6e:4x4``);
    meshes: ``;``-separated mesh specs (``sleep_jax.mesh``), each over all its chips;
    preset: the model (``models.config.PRESETS``); overrides: integer ModelConfig fields of
      the preset to change, e.g. ``layers=4,vocab=32000``; grow_to: the grown target's overrides
      (``grow.spec.target_config``: expert slots by default); target: the model of the train,
      decode and GRPO steps, "base" or "grown" (seeding is base -> grown, grow base -> grown);
    steps: ``,``-separated, from ``steps.STEPS``; teacher_mesh: the seeding teacher's layout;
    batch_per_chip: global rows B = this x chips; seq_len T, prompt_len, new_tokens,
      memory_len: see ``steps.PlanShapes``;
    dtype, param_dtype, remat: ModelConfig overrides (bf16 matmuls, fp32 parameters, full remat
      by default: a TPU run's settings); unroll: build the layer scan unrolled so the figures
      count every layer (``ModelConfig.unroll_layers``; False shows the undercount);
    depth_fit: for a model deeper than 2 layers, compile each step at 1 and 2 layers (unrolled)
      and extrapolate every figure linearly to L (``extrapolate``): the layers are identical,
      so FLOPs, bytes, collectives, arguments and outputs are exact affine functions of L and
      temporaries nearly so; the memory is that of a third compile, the full depth with the
      layer scan (the program that runs: unrolled, XLA may gather every layer's weights at
      once). Compiling 32 unrolled layers of llama_8b for 256 chips did not finish a single
      step in 14 minutes on this 2-core host. False compiles the full depth;
    measure: also time each step on the host's CPU devices (tiny preset only),
      measure_repeats calls after the compiling one; out: JSON file to write (optional).
    """

    topology: str = "v5e:16x16"
    meshes: str = "fsdp=-1;data=2,fsdp=-1;fsdp=-1,tensor=4"
    preset: str = "llama_8b"
    overrides: str = ""
    grow_to: str = "expert_slots=4,expert_rank=64"
    target: str = "base"
    steps: str = ",".join(steps_mod.STEPS)
    teacher_mesh: str = "fsdp=-1"
    batch_per_chip: int = 1
    seq_len: int = 2048
    prompt_len: int = 256
    new_tokens: int = 64
    memory_len: int = 512
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "full"
    unroll: bool = True
    depth_fit: bool = True
    measure: bool = False
    measure_repeats: int = 3
    out: str = ""

    def __post_init__(self):
        chips_mod.chip_of(self.topology)
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}; allowed: {', '.join(TARGETS)}")
        bad = [s for s in self.step_list() if s not in steps_mod.STEPS]
        if bad or not self.step_list():
            raise ValueError(f"steps={self.steps!r}: unknown {bad}; allowed: "
                             f"{', '.join(steps_mod.STEPS)}")
        if not self.mesh_list():
            raise ValueError("meshes is empty; e.g. 'fsdp=-1;data=2,fsdp=-1'")
        if self.batch_per_chip < 1 or self.measure_repeats < 1:
            raise ValueError(f"batch_per_chip={self.batch_per_chip} and measure_repeats="
                             f"{self.measure_repeats} must be >= 1")
        if self.measure and self.preset != "tiny":
            raise ValueError(f"measure=True times the steps on this host's CPU devices: only "
                             f"the tiny preset (got preset={self.preset!r})")

    def step_list(self) -> list[str]:
        return [s.strip() for s in self.steps.split(",") if s.strip()]

    def mesh_list(self) -> list[str]:
        return [m.strip() for m in self.meshes.split(";") if m.strip()]


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology, from libtpu (needs the ``plan`` extra)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError("sleep-jax plan compiles for TPU with libtpu: pip install -e "
                           "'.[plan]' (the version jax pins; see constraints.txt)") from None
    from jax.experimental import topologies

    # Compile-only: no TPU is opened, so several processes (pytest workers, a second plan) may
    # load libtpu at once; without this libtpu refuses all but the first (/tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology).devices)
    except Exception as e:  # libtpu's own error for an unknown shape
        raise ValueError(f"topology {topology!r} is not known to libtpu: {e}") from None


def models(cfg: PlanConfig):
    """(base, grown, target) ModelConfigs with the plan's numerics."""
    from sleep_jax.grow.api import grown_config
    from sleep_jax.grow.spec import parse_overrides, target_config
    from sleep_jax.models.config import get_preset

    base = get_preset(cfg.preset, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      remat=cfg.remat, unroll_layers=cfg.unroll,
                      **parse_overrides(cfg.overrides))
    grown = grown_config(base, target_config(base, cfg.grow_to))
    return base, grown, (base if cfg.target == "base" else grown)


def extrapolate(r1: dict, r2: dict, layers: int) -> dict:
    """A step's report at ``layers`` layers from its reports at 1 and 2: x(L) = x1 + (L-1)(x2-x1)
    for every figure (memory fields, FLOPs, bytes, collective counts and bytes), compile time
    the sum, loops those of the 2-layer program."""
    lin = lambda a, b: a + (layers - 1) * (b - a)
    out = dict(r2)
    out["memory"] = {k: lin(r1["memory"][k], v) for k, v in r2["memory"].items()}
    for k in ("flops", "bytes_accessed"):
        out[k] = lin(r1[k], r2[k])
    out["collectives"] = {k: {f: lin(r1["collectives"][k][f], v[f]) for f in v}
                          for k, v in r2["collectives"].items()}
    out["compile_s"] = r1["compile_s"] + r2["compile_s"]
    out["depth_fit"] = f"compiled at 1 and 2 layers, extrapolated to {layers}"
    return out


def _compile_step(name, cfg: PlanConfig, base, grown, target, mesh, teacher_mesh, shapes):
    """The step's report, by depth fit when the model is deeper than 2 layers (see PlanConfig)."""
    def one(b_cfg, g_cfg, t_cfg):
        b = steps_mod.build(name, base=b_cfg, grown=g_cfg, target=t_cfg, mesh=mesh,
                            teacher_mesh=teacher_mesh, shapes=shapes)
        return steps_mod.compile_built(b)[1]

    if not cfg.depth_fit or base.layers <= 2:
        return one(base, grown, target)
    reps = [one(*(c.replace(layers=n) for c in (base, grown, target))) for n in (1, 2)]
    out = extrapolate(reps[0], reps[1], base.layers)
    # Memory from the program that runs: the full depth with the layer scan (an unrolled
    # program may schedule every layer's weight gathers at once, which a scan does not).
    scanned = one(*(c.replace(unroll_layers=False) for c in (base, grown, target)))
    out["memory"] = scanned["memory"]
    out["memory_from"] = "the scanned full-depth program"
    out["compile_s"] += scanned["compile_s"]
    return out


def _ici_bytes(coll: dict) -> float:
    return sum(v["bytes"] * (2 if k == "all-reduce" else 1) for k, v in coll.items())


def _row(mesh_spec: str, name: str, report: dict, chip, n_chips: int, model_cfg, shapes):
    r = dict(mesh=mesh_spec, step=name, **report)
    ici = _ici_bytes(report["collectives"])
    r["ici_bytes"] = ici
    r["roofline"] = chips_mod.roofline(report["flops"], report["bytes_accessed"], ici, chip)
    r["fits"] = report["memory"]["total"] <= chip.hbm_bytes
    if name == "train":
        from sleep_jax.models.config import flops_per_token

        model_flops = flops_per_token(model_cfg, shapes.seq_len) * report["tokens"] / n_chips
        r["model_flops_per_chip"] = model_flops
        r["mfu_at_estimate"] = model_flops / (chip.peak_flops * r["roofline"]["step_s"])
    return r


def run_plan(cfg: PlanConfig, log=print) -> dict:
    """Compile every (mesh, step); return the plan (see the module docstring)."""
    import jax

    from sleep_jax.mesh import make_mesh, mesh_name

    chip = chips_mod.chip_of(cfg.topology)
    devices = topology_devices(cfg.topology)
    n = len(devices)
    base, grown, target = models(cfg)
    shapes = steps_mod.PlanShapes(cfg.batch_per_chip * n, cfg.seq_len, cfg.prompt_len,
                                  cfg.new_tokens, cfg.memory_len)
    teacher_mesh = make_mesh(cfg.teacher_mesh, devices=devices)
    cpu = jax.devices("cpu") if cfg.measure else None
    rows = []
    t_all = time.perf_counter()
    for spec in cfg.mesh_list():
        mesh = make_mesh(spec, devices=devices)
        for name in cfg.step_list():
            t0 = time.perf_counter()
            try:
                rep = _compile_step(name, cfg, base, grown, target, mesh, teacher_mesh, shapes)
            except Exception as e:  # one (mesh, step) failing does not stop the plan
                rows.append({"mesh": mesh_name(mesh), "step": name, "fits": False,
                             "error": f"{type(e).__name__}: {e}"[:500]})
                log(f"plan: {mesh_name(mesh)} {name}: FAILED {rows[-1]['error']}")
                continue
            row = _row(mesh_name(mesh), name, rep, chip, n, target, shapes)
            if cpu is not None:
                row["cpu_measured"] = _measure(name, spec, cpu, base, grown, target,
                                               cfg, shapes)
            rows.append(row)
            log(f"plan: {row['mesh']} {name}: {row['memory']['total'] / 2**30:.2f} GiB/chip "
                f"({'fits' if row['fits'] else 'DOES NOT FIT'}), est. "
                f"{1e3 * row['roofline']['step_s']:.2f} ms ({row['roofline']['bound']}), "
                f"{time.perf_counter() - t0:.1f} s")
    best_by_step = {}
    for name in cfg.step_list():
        ok = [r for r in rows if r["step"] == name and r.get("fits")]
        if ok:
            best_by_step[name] = min(ok, key=lambda r: r["roofline"]["step_s"])["mesh"]
    first = cfg.step_list()[0]
    return {
        "topology": cfg.topology, "chips": n, "device_kind": devices[0].device_kind,
        "chip": dataclasses.asdict(chip), "preset": cfg.preset, "target": cfg.target,
        "grow_to": cfg.grow_to, "model": target.to_dict(), "grown": grown.to_dict(),
        "shapes": dataclasses.asdict(shapes), "teacher_mesh": mesh_name(teacher_mesh),
        "rows": rows, "best_mesh": best_by_step.get(first), "best_for_step": first,
        "best_by_step": best_by_step, "wall_s": time.perf_counter() - t_all,
        "note": ("compile-only for TPU on a CPU host; per-chip figures from XLA's "
                 "memory_analysis/cost_analysis/HLO; roofline = max(compute, HBM, ICI)"),
    }


def _measure(name, spec, cpu, base, grown, target, cfg, shapes) -> dict:
    """The same step on the host's CPU devices (labelled CPU)."""
    from sleep_jax.mesh import make_mesh

    try:
        mesh = make_mesh(spec, devices=cpu)
        tmesh = make_mesh(cfg.teacher_mesh, devices=cpu)
        b = steps_mod.build(name, base=base, grown=grown, target=target, mesh=mesh,
                            teacher_mesh=tmesh, shapes=shapes)
        out = steps_mod.time_built(b, cfg.measure_repeats)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    out["device"] = f"cpu x{len(cpu)} (host CPU devices sharing its cores)"
    return out


def _gib(x):
    return f"{x / 2**30:.2f}"


def markdown(plan: dict) -> str:
    """The plan as a markdown table (one row per mesh and step)."""
    chip = plan["chip"]
    lines = [f"Mesh plan: {plan['preset']} ({plan['target']}) on {plan['topology']} "
             f"({plan['chips']} chips, {chip['name']}: {chip['peak_flops'] / 1e12:g} TFLOP/s, "
             f"{_gib(chip['hbm_bytes'])} GiB HBM at {chip['hbm_bw'] / 1e9:g} GB/s, ICI "
             f"{chip['ici_bw'] / 1e9:g} GB/s), shapes {plan['shapes']}", "",
             "| mesh | step | GiB/chip (args/out/temp) | fits | GFLOP/chip | GB accessed | "
             "collectives count / MB (AR, AG, RS, A2A, CP) | est. ms (bound) | loops | "
             "compile s | CPU ms |", "|" + "---|" * 11]
    for r in plan["rows"]:
        if "error" in r:
            lines.append(f"| {r['mesh']} | {r['step']} | {r['error'][:80]} |" + " |" * 8)
            continue
        m, c = r["memory"], r["collectives"]
        coll = ", ".join(f"{v['count']}/{v['bytes'] / 1e6:.1f}" for v in c.values())
        loops = ",".join("?" if t is None else str(t) for t in r["loops"]) or "-"
        cpu = r.get("cpu_measured", {})
        cpu_s = f"{1e3 * cpu['median_s']:.1f}" if "median_s" in cpu else "-"
        lines.append(
            f"| {r['mesh']} | {r['step']} | {_gib(m['total'])} ({_gib(m['argument'])}/"
            f"{_gib(m['output'])}/{_gib(m['temp'])}) | {'yes' if r['fits'] else '**NO**'} | "
            f"{r['flops'] / 1e9:.1f} | {r['bytes_accessed'] / 1e9:.2f} | {coll} | "
            f"{1e3 * r['roofline']['step_s']:.2f} ({r['roofline']['bound']}) | {loops} | "
            f"{r['compile_s']:.1f} | {cpu_s} |")
    lines += ["", f"best mesh for {plan['best_for_step']}: {plan['best_mesh'] or 'none fits'}; "
              f"by step: {plan['best_by_step']}"]
    train = [r for r in plan["rows"] if r["step"] == "train" and "error" not in r]
    for r in train:
        lines.append(f"train on {r['mesh']}: model FLOPs (6N+12LDT) / compiled FLOPs = "
                     f"{r['model_flops_per_chip'] / max(r['flops'], 1):.2f}, MFU at the "
                     f"estimate {100 * r['mfu_at_estimate']:.1f}%")
    if any("cpu_measured" in r for r in plan["rows"]):
        lines.append("CPU ms: the same step timed on this host's CPU devices (not a TPU "
                     "prediction).")
    return "\n".join(lines)
