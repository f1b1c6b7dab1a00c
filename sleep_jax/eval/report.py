"""Sleep reports: report.json (every figure), report.md (tables), PNG plots, seed summaries."""

from __future__ import annotations

import os

import numpy as np

from sleep_jax.atomic import atomic_open, write_json, write_text

COLUMNS = (("closed_new_near", "NEW near"), ("closed_new_far", "NEW far"),
           ("closed_old_near", "OLD near"), ("closed_old_far", "OLD far"),
           ("kl_to_base", "KL to base"))


def _row(name: str, r: dict) -> str:
    cells = [f"{r[k]:.3f}" if k in r else "" for k, _ in COLUMNS]
    return f"| {name} | " + " | ".join(cells) + " |"


def _config_row(method: str, c: dict) -> str:
    """One method's own configs (SleepConfig, SeedingConfig, ReplayConfig) as a table row."""
    sl, sd, rp = c["sleep"], c.get("seeding"), c["replay"]
    opt = sl["optim"] if sl["expert"] else sl["full_optim"]
    student = (f"expert slot rank {sl['rank']}" + (" + router" if sl["router"] else "")
               if sl["expert"] else "full model")
    if sd is None:
        options = "SFT on the memories (LM loss)"
    else:
        defaults = {"gate_l1": 0.0, "expert_l1": 0.0, "alpha": 1.0}
        changed = [f"{k}={sd[k]}" for k in defaults if sd[k] != defaults[k]]
        options = (f"{sd['divergence']}, lam {sd['lam']}, {sd['max_new_tokens']} tokens"
                   + ("; " + ", ".join(changed) if changed else ""))
    return (f"| {method} | {student} | {opt['lr']:g} | {opt['warmup_steps']} | {sl['steps']} | "
            f"{sl['batch_size']} | {rp['fraction']:g} | {options} |")


def markdown(report: dict) -> str:
    """The results table of one seed as markdown."""
    base = report["base"]
    lines = [f"# Sleep demo, seed {report['seed']}", "",
             "Closed-book exact match on HELD-OUT wordings (never trained on); OLD = retention.",
             "", "| method | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|", _row("base (before sleep)", base)]
    for m, r in report["methods"].items():
        lines.append(_row(m, r))
    lines += ["", f"Open book NEW (in-context only, the teacher's level): near "
              f"{base['open_new_near']:.3f}, far {base['open_new_far']:.3f}.", ""]
    if report.get("seeding_step_cost_x_sft") is not None:
        lines.append(f"Seeding step cost: {report['seeding_step_cost_x_sft']:.2f}x an SFT step "
                     f"of the grown model ({report['sft_step_s_grown'] * 1e3:.1f} ms).")
    lines.append("")
    lines.append("| method | step ms | compile s | wall s |")
    lines.append("|---|---|---|---|")
    for m, t in report["timing"].items():
        lines.append(f"| {m} | {t['step_s'] * 1e3:.1f} | {t['compile_s']:.1f} | "
                     f"{t['wall_s']:.0f} |")
    configs = report.get("method_configs") or {}
    if configs:
        lines += ["", "| method | student | lr | warmup | steps | batch | replay | seeding "
                  "options |", "|---|---|---|---|---|---|---|---|"]
        for m, c in configs.items():
            lines.append(_config_row(m, c))
    lines += ["", f"Base training {report['base_train_s']:.0f} s; whole seed "
              f"{report['wall_s']:.0f} s on {report['platform']}.", "",
              "![accuracy over steps](curves.png)", "", "![before/after](bars.png)", ""]
    return "\n".join(lines)


def plots(report: dict, workdir: str) -> list[str]:
    """curves.png (closed-book NEW near over sleep steps) and bars.png (before/after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, c in report["curves"].items():
        steps, acc = zip(*c)
        ax.plot(steps, acc, marker="o", label=m)
    ax.axhline(report["base"]["open_new_near"], ls="--", c="grey", label="open book (teacher)")
    ax.set_xlabel("sleep step")
    ax.set_ylabel("closed-book NEW accuracy (near)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "curves.png"))
    with atomic_open(paths[-1], "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = ["base"] + list(report["methods"])
    rows = [report["base"]] + list(report["methods"].values())
    keys = [k for k, _ in COLUMNS[:4]]
    w = 0.8 / len(names)
    for i, (n, r) in enumerate(zip(names, rows)):
        ax.bar(np.arange(len(keys)) + i * w, [r[k] for k in keys], w, label=n)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2, [h for _, h in COLUMNS[:4]])
    ax.set_ylabel("closed-book accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "bars.png"))
    with atomic_open(paths[-1], "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return paths


def write_report(report: dict, workdir: str) -> None:
    """Write report.json, report.md and the plots into ``workdir`` (each atomically)."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "report.json"), report, default=float)
    write_text(os.path.join(workdir, "report.md"), markdown(report))
    plots(report, workdir)


def summary_table(reports: list[dict]) -> tuple[str, dict]:
    """Mean and spread (min-max half range) over seeds: (markdown, data)."""
    names = ["base"] + list(reports[0]["methods"])
    data = {}
    for n in names:
        rs = [r["base"] if n == "base" else r["methods"][n] for r in reports]
        data[n] = {k: {"mean": float(np.mean([r[k] for r in rs])),
                       "spread": float((max(r[k] for r in rs) - min(r[k] for r in rs)) / 2)}
                   for k, _ in COLUMNS}
    for k in ("open_new_near", "open_new_far"):
        vals = [r["base"][k] for r in reports]
        data["base"][k] = {"mean": float(np.mean(vals)),
                           "spread": float((max(vals) - min(vals)) / 2)}
    costs = [r["seeding_step_cost_x_sft"] for r in reports
             if r.get("seeding_step_cost_x_sft") is not None]
    data["seeding_step_cost_x_sft"] = float(np.mean(costs)) if costs else None
    data["seeds"] = [r["seed"] for r in reports]
    pm = lambda d: f"{d['mean']:.3f} ± {d['spread']:.3f}" if len(reports) > 1 else \
        f"{d['mean']:.3f}"
    lines = [f"Sleep demo over {len(reports)} seed(s): closed-book exact match on held-out "
             "wordings", "", "| method | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(pm(data[n][k]) for k, _ in COLUMNS) + " |")
    lines.append("")
    lines.append(f"open book NEW (teacher): near {pm(data['base']['open_new_near'])}, far "
                 f"{pm(data['base']['open_new_far'])}")
    if costs:
        lines.append(f"seeding step cost: {data['seeding_step_cost_x_sft']:.2f}x an SFT step")
    return "\n".join(lines), data
