"""Sleep demo reports: report.json (every figure), report.md (tables), PNG plots, seed summaries.

One seed's report dict (built by ``sleep_jax.demo_run``) holds the base model's figures, the
in-context baseline, and per method the checkpoint chosen by the validation rule of
``sleep_jax.eval.select`` ("selected", None when no evaluation point qualifies) and the
end-of-budget checkpoint ("end"), with the validation curves and timings. ``write_report`` writes
report.json, report.md and four plots (tradeoff.png, curves.png, walltime.png, bars.png);
``summary_table`` reduces several seeds to mean and spread (half the min-max range).

Units: report.json and the summary data hold accuracies as fractions in [0, 1]; report.md shows
them in percent and gains / drops in percentage points ("points").

Domination (``dominating``): method A dominates on validation when A qualifies and, against
every other qualifying method B, A's selected point has val NEW gain >= B's and val OLD drop <=
B's, strictly better in at least one of the two (differences within ``select.EPS`` are ties). A
method that does not qualify is dominated by any method that does. Fewer than two methods: none
dominates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from sleep_jax.atomic import atomic_open, write_json, write_text
from sleep_jax.eval.select import EPS

# (key, header) of the accuracy / KL columns of a checkpoint row
TEST_COLUMNS = (("closed_new_near", "NEW near"), ("closed_new_far", "NEW far"),
                ("closed_old_near", "OLD near"), ("closed_old_far", "OLD far"))
ACC_KEYS = tuple(k for k, _ in TEST_COLUMNS)
POINT_KEYS = ACC_KEYS + ("kl_to_base", "val_new", "val_old")
HEADER = ("| method | step | NEW near | NEW far | OLD near | OLD far | KL to base | val NEW | "
          "val OLD drop |")
RULE = "|---" * 9 + "|"
PLOT_FILES = ("tradeoff.png", "curves.png", "walltime.png", "bars.png")
# reference rows of the bar plot (not methods): fixed greys, kept out of the method palette
REFERENCE_COLOURS = {"base": "#404040", "in-context": "#8c8c8c", "open book": "#c8c8c8"}
DASH = "—"


# ------------------------------------------------------------------------------- helpers
def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One fixed colour per method from its position in ``methods`` (the display order).

    tab10 without its grey (greys are the reference rows), then the light half of tab20,
    then cycling. Every plot of a report takes its colours from this one map.
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab10 = [to_hex(c) for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    light = [to_hex(c) for i, c in enumerate(colormaps["tab20"].colors) if i % 2 and i != 15]
    palette = tab10 + light
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def val_gain(report: Mapping, point: Mapping) -> float:
    """val NEW gain of an evaluation point over the base (fraction)."""
    return float(point["val_new"]) - float(report["base"]["val_new"])


def val_drop(report: Mapping, point: Mapping) -> float:
    """val OLD drop of an evaluation point: base val OLD minus its val OLD (fraction)."""
    return float(report["base"]["val_old"]) - float(point["val_old"])


def dominating(report: Mapping) -> str | None:
    """The method that dominates on validation (module docstring), or None."""
    methods = report["methods"]
    if len(methods) < 2:
        return None
    pts = {m: (val_gain(report, r["selected"]), val_drop(report, r["selected"]))
           for m, r in methods.items() if r["selected"] is not None}
    for a, (ga, da) in pts.items():
        ok = True
        for b, (gb, db) in pts.items():
            if b == a:
                continue
            if ga < gb - EPS or da > db + EPS or (abs(ga - gb) <= EPS and abs(da - db) <= EPS):
                ok = False
                break
        if ok:
            return a
    return None


def tradeoff_points(report: Mapping) -> dict[str, list[tuple[int, float, float]]]:
    """Per method the validation trade-off curve: [(step, val NEW gain, val OLD drop), ...]."""
    return {m: [(int(p["step"]), val_gain(report, p), val_drop(report, p)) for p in c]
            for m, c in report["curves"].items()}


def check(report: Mapping) -> None:
    """Raises ValueError when the report lacks what the tables need or contradicts itself."""
    for k in ("seed", "max_old_drop", "base", "in_context", "methods", "curves", "timing"):
        if k not in report:
            raise ValueError(f"report lacks {k!r}")
    missing = [k for k in ACC_KEYS + ("open_new_near", "open_new_far", "val_new", "val_old",
                                      "kl_to_base") if k not in report["base"]]
    if missing:
        raise ValueError(f"report['base'] lacks {missing}")
    for m, r in report["methods"].items():
        if bool(r.get("qualifies", r["selected"] is not None)) != (r["selected"] is not None):
            raise ValueError(f"method {m}: qualifies={r.get('qualifies')} but selected is "
                             f"{'None' if r['selected'] is None else 'set'}")
        for which in ("selected", "end"):
            p = r[which]
            if p is not None:
                lack = [k for k in ("step",) + POINT_KEYS if k not in p]
                if lack:
                    raise ValueError(f"method {m}: {which} lacks {lack}")


def _pct(x) -> str:
    return DASH if x is None else f"{100 * float(x):.1f}"


def _pts(x, sign: bool = False) -> str:
    return DASH if x is None else (f"{100 * float(x):+.1f}" if sign else f"{100 * float(x):.1f}")


def _threshold_text(max_old_drop: float) -> str:
    return f"{100 * max_old_drop:g} points"


def _point_row(report: Mapping, name: str, p: Mapping) -> str:
    cells = [str(int(p["step"]))] + [_pct(p[k]) for k in ACC_KEYS] + [
        f"{float(p['kl_to_base']):.3f}", _pct(p["val_new"]), _pts(val_drop(report, p))]
    return f"| {name} | " + " | ".join(cells) + " |"


def _reference_rows(report: Mapping, with_context: bool) -> list[str]:
    b, ic = report["base"], report["in_context"]
    rows = [f"| base (before sleep) | {DASH} | " + " | ".join(_pct(b[k]) for k in ACC_KEYS)
            + f" | {float(b['kl_to_base']):.3f} | {_pct(b['val_new'])} | 0.0 |"]
    if with_context:
        n = report.get("store_size")
        rows.append(f"| in-context (last {n} memories) | {DASH} | "
                    f"{_pct(ic.get('closed_new_near'))} | {_pct(ic.get('closed_new_far'))} | "
                    + " | ".join([DASH] * 5) + " |")
        rows.append(f"| open book (teacher's level) | {DASH} | {_pct(b['open_new_near'])} | "
                    f"{_pct(b['open_new_far'])} | " + " | ".join([DASH] * 5) + " |")
    return rows


def _flatten(d, prefix: str = "") -> list[str]:
    out = []
    if isinstance(d, Mapping):
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}.")
    else:
        v = f"{d:g}" if isinstance(d, float) else str(d)
        out.append(f"{prefix[:-1]}={v}")
    return out


def _train_s(report: Mapping, m: str):
    c = report["curves"].get(m) or []
    return float(c[-1]["train_s"]) if c and "train_s" in c[-1] else None


# ------------------------------------------------------------------------------ markdown
def explanation(report: Mapping) -> list[str]:
    """The paragraph that makes report.md readable on its own."""
    thr = _threshold_text(report["max_old_drop"])
    n = report.get("store_size")
    return [
        "## Setting", "",
        "A small language model is first trained (\"wake\") on a synthetic world of fictional "
        "people; the facts it learns then are the **OLD** facts. Each method then consolidates "
        "**NEW** memories (passages about other people) into the model's weights. All "
        "accuracies are **closed-book** exact match: the model answers a question with no "
        "passage in its context. Accuracies are in percent, gains and drops in percentage "
        "points.", "",
        "- **NEW near / NEW far / OLD near / OLD far**: held-out TEST wordings of the questions "
        "(never trained on), read only for these tables; *near* changes one word of a training "
        "wording, *far* has another structure (the name first).",
        "- **val NEW / val OLD**: different held-out *validation* wordings, used to choose each "
        "method's checkpoint. The rule: among a method's evaluation points (step 0 included), "
        f"the one with the highest val NEW whose val OLD drop is at most {thr}; a method with "
        "no such point does not qualify. Test wordings play no part in the choice.",
        "- **OLD drop** = base OLD minus OLD (positive = forgetting); **val NEW gain** = val NEW "
        "minus the base's val NEW.",
        "- **KL to base** = mean per-token KL divergence to the base model on general text "
        "(how much the model changed outside the memories).",
        f"- **in-context** = the untrained base answering with a store of the last {n} "
        "memories in its context (a baseline with no training).",
        "- **open book** = the base reading the right passage before the question: the "
        "teacher's level, an upper reference for NEW.", ""]


def domination_sentence(report: Mapping) -> str:
    m = dominating(report)
    rule = ("its selected point has val NEW gain >= and val OLD drop <= those of every other "
            "qualifying method, strictly better in at least one; a method that does not qualify "
            "counts as dominated")
    if m is None:
        return f"**No method dominates** on validation (a method dominates when {rule})."
    others = [o for o, r in report["methods"].items() if o != m and r["selected"] is not None]
    extra = "" if others else " (it is the only method that qualifies)"
    return f"**{m} dominates** on validation{extra}: {rule}."


def _dreaming_lines(report: Mapping) -> list[str]:
    """The dreaming rows' section: the generator's reward over updates, and per row its kept
    dreams (with the untrained generator: dreams before training; else after)."""
    d = report.get("dreaming")
    if not d:
        return []
    curve = ", ".join(f"{s}: {r:+.3f}" for s, r in d["rewards"])
    out = ["", "## Dreaming", "",
           f"The generator was trained {d['updates']} updates on {d['contexts']} TASK contexts "
           f"(entities no evaluation asks about) in {d['wall_s']:.0f} s. Its mean reward (the "
           f"contrastive log-prob gain on the context's own questions over the null dream, an "
           f"adapter fine-tuned on the context itself) by update: {curve}.", ""]
    for m, r in report["methods"].items():
        rh = r.get("rehearsal")
        if not rh:
            continue
        dr = rh["dreams"]
        lm = ("" if rh.get("lm_loss_first") is None else
              f", dream-row LM loss {rh['lm_loss_first']:.3f} -> {rh['lm_loss_last']:.3f}")
        out.append(f"- **{m}**: {dr['kept']} dreams kept about {dr['contexts']} memories "
                   f"({100 * dr['copy_share']:.0f}% copy their memory verbatim, "
                   f"{dr['dropped_probe']} dropped for holding an evaluation question), "
                   f"{rh['steps']} rehearsal steps{lm}. Dreams: "
                   + " / ".join(f"`{x}`" for x in rh.get("samples", [])))
    return out


def markdown(report: Mapping) -> str:
    """report.md of one seed."""
    check(report)
    thr = _threshold_text(report["max_old_drop"])
    methods = report["methods"]
    nq = f"does not qualify (OLD drop > {thr} at every step)"
    lines = [f"# Sleep demo, seed {report['seed']}", ""] + explanation(report)
    lines += ["## 1. Selected checkpoint (validation rule)", "", domination_sentence(report), "",
              HEADER, RULE] + _reference_rows(report, with_context=True)
    for m, r in methods.items():
        if r["selected"] is None:
            lines.append(f"| {m} | {nq} | " + " | ".join([DASH] * 7) + " |")
        else:
            lines.append(_point_row(report, m, r["selected"]))
    lines += ["", "## 2. End of budget", "",
              "The last step of each method's budget, whatever its validation OLD drop.", "",
              HEADER, RULE] + _reference_rows(report, with_context=False)
    for m, r in methods.items():
        lines.append(_point_row(report, m, r["end"]))

    sft = report.get("sft_step_s")
    lines += ["", "## 3. Cost", ""]
    if sft:
        lines.append(f"*x SFT step* = the method's typical training step time divided by the "
                     f"time of one SFT step (LM loss) of the grown model on the seeding batch "
                     f"shape (the same rows, prompt + completion tokens long): "
                     f"{1e3 * sft:.1f} ms. A seeding step adds the teacher's forward pass over "
                     f"memory + prompt and the sampling of completions; the SFT methods' own "
                     f"rows are longer (one passage, or packed wake text, per row), so their "
                     f"steps cost more than this unit.")
    else:
        lines.append("*x SFT step*: no SFT step time was measured for this report.")
    lines += ["", "*train s* = training wall time up to the last evaluation point (evaluation "
              "excluded); *wall s* = the method's total wall time as the demo measured it "
              "(compilation and evaluation add to training).", "",
              "| method | step ms | x SFT step | compile s | train s | wall s |",
              "|---|---|---|---|---|---|"]
    timing = report["timing"]
    for m in list(methods) + [t for t in timing if t not in methods]:
        t = timing.get(m)
        if t is None:
            lines.append(f"| {m} | " + " | ".join([DASH] * 5) + " |")
            continue
        cost = f"{t['step_s'] / sft:.2f}x" if sft else DASH
        tr = _train_s(report, m)
        lines.append(f"| {m} | {1e3 * t['step_s']:.1f} | {cost} | {t['compile_s']:.1f} | "
                     f"{DASH if tr is None else f'{tr:.1f}'} | {t['wall_s']:.0f} |")

    lines += ["", "## Methods", ""]
    for m, r in methods.items():
        lines.append(f"- **{m}**: {r.get('description', '')}")
        if r.get("extra"):
            lines.append("  - " + ", ".join(f"{k} {float(v):.3g}" for k, v in r["extra"].items()))
    lines += _dreaming_lines(report)
    configs = report.get("method_configs") or {}
    if configs:
        lines += ["", "<details><summary>method configs (all in report.json)</summary>", ""]
        for m, c in configs.items():
            lines.append(f"- **{m}**: `" + ", ".join(_flatten(c)) + "`")
        lines += ["", "</details>"]

    lines += ["", "## Validation trade-off points", "",
              "Per method (step: val NEW gain / val OLD drop, in points); * = selected.", "",
              "| method | points |", "|---|---|"]
    for m, pts in tradeoff_points(report).items():
        sel = (methods.get(m) or {}).get("selected")
        s = sel["step"] if sel else None
        cells = "; ".join(f"{st}{'*' if st == s else ''}: {100 * g:+.1f} / {100 * d:.1f}"
                          for st, g, d in pts)
        lines.append(f"| {m} | {cells} |")
    lines += ["", f"Base training {report['base_train_s']:.0f} s; whole seed "
              f"{report['wall_s']:.0f} s on {report['platform']}.", "",
              "## Plots", "",
              f"Validation trade-off: val NEW gain against val OLD drop at each evaluation point "
              f"(large marker = selected; dashed line = the {thr} limit).", "",
              "![trade-off](tradeoff.png)", "",
              "Validation curves over training steps.", "", "![curves](curves.png)", "",
              "val NEW gain against training wall time.", "", "![wall time](walltime.png)", "",
              "Test wordings at the selected checkpoint (methods that do not qualify are left "
              "out).", "", "![selected checkpoint](bars.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- plots
def figures(report: Mapping) -> dict[str, object]:
    """The four plots as matplotlib figures, {file name: figure}; colours from one
    ``method_colours`` map over the report's methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    names = list(methods) + [m for m in report["curves"] if m not in methods]
    colour = method_colours(names)
    thr = 100 * report["max_old_drop"]
    base = report["base"]
    figs = {}

    def selected_step(m):
        sel = (methods.get(m) or {}).get("selected")
        return None if sel is None else int(sel["step"])

    # (1) trade-off
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, pts in tradeoff_points(report).items():
        if not pts:
            continue
        steps, g, d = zip(*pts)
        ax.plot(100 * np.array(d), 100 * np.array(g), marker="o", ms=4, color=colour[m],
                label=m)
        s = selected_step(m)
        if s in steps:
            i = steps.index(s)
            ax.plot(100 * d[i], 100 * g[i], marker="*", ms=16, color=colour[m], mec="black",
                    ls="none")
    ax.axvline(thr, ls="--", c="grey", label=f"max OLD drop ({thr:g} points)")
    ax.set_xlabel("val OLD drop (points)")
    ax.set_ylabel("val NEW gain (points)")
    ax.set_title("validation trade-off (star = selected)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["tradeoff.png"] = fig

    # (2) curves
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    for m, c in report["curves"].items():
        if not c:
            continue
        steps = [p["step"] for p in c]
        a1.plot(steps, [100 * p["val_new"] for p in c], marker="o", ms=3, color=colour[m],
                label=m)
        a2.plot(steps, [100 * p["val_old"] for p in c], marker="o", ms=3, color=colour[m],
                label=m)
        s = selected_step(m)
        if s is not None:
            a1.axvline(s, color=colour[m], ls=":", lw=1)
    a1.axhline(100 * base["val_new"], ls="--", c="grey", label="base")
    a2.axhline(100 * base["val_old"], ls="--", c="grey", label="base")
    a2.axhline(100 * base["val_old"] - thr, ls=":", c="black",
               label=f"base - {thr:g} points (limit)")
    a1.set_ylabel("val NEW (%)")
    a2.set_ylabel("val OLD (%)")
    a2.set_xlabel("training step")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    a1.set_title("validation accuracy (dotted vertical = selected step)")
    fig.tight_layout()
    figs["curves.png"] = fig

    # (3) wall time
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, c in report["curves"].items():
        pts = [p for p in c if "train_s" in p]
        if not pts:
            continue
        ax.plot([p["train_s"] for p in pts], [100 * val_gain(report, p) for p in pts],
                marker="o", ms=4, color=colour[m], label=m)
        s = selected_step(m)
        for p in pts:
            if p["step"] == s:
                ax.plot(p["train_s"], 100 * val_gain(report, p), marker="*", ms=16,
                        color=colour[m], mec="black", ls="none")
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("val NEW gain (points)")
    ax.set_title("val NEW gain against training time (star = selected)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["walltime.png"] = fig

    # (4) bars at the selected checkpoint
    ic = report["in_context"]
    rows = [("base", [base[k] for k in ACC_KEYS], REFERENCE_COLOURS["base"]),
            ("in-context", [ic.get("closed_new_near"), ic.get("closed_new_far"), None, None],
             REFERENCE_COLOURS["in-context"]),
            ("open book", [base["open_new_near"], base["open_new_far"], None, None],
             REFERENCE_COLOURS["open book"])]
    left_out = []
    for m, r in methods.items():
        if r["selected"] is None:
            left_out.append(m)
        else:
            rows.append((m, [r["selected"][k] for k in ACC_KEYS], colour[m]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.8 / len(rows)
    x = np.arange(len(ACC_KEYS))
    for i, (n, vals, col) in enumerate(rows):
        xs = [x[j] + i * w for j, v in enumerate(vals) if v is not None]
        ys = [100 * v for v in vals if v is not None]
        ax.bar(xs, ys, w, color=col, label=n, edgecolor="black", lw=0.3)
    ax.set_xticks(x + 0.4 - w / 2, [h for _, h in TEST_COLUMNS])
    ax.set_ylabel("closed-book accuracy (%)")
    ax.set_ylim(0, 105)
    title = "test wordings at the selected checkpoint"
    if left_out:
        title += f"\n(not qualifying, left out: {', '.join(left_out)})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    figs["bars.png"] = fig
    return figs


def plots(report: Mapping, workdir: str) -> list[str]:
    """Writes the four PNGs into ``workdir`` (each atomically); returns their paths."""
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in figures(report).items():
        paths.append(os.path.join(workdir, name))
        with atomic_open(paths[-1], "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
    return paths


def write_report(report: dict, workdir: str) -> None:
    """Write report.json, report.md and the plots into ``workdir`` (each atomically).

    report.json is written first, so the figures survive a report that ``check`` rejects."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "report.json"), report, default=float)
    write_text(os.path.join(workdir, "report.md"), markdown(report))
    plots(report, workdir)


# ------------------------------------------------------------------------------- summary
SUMMARY_KEYS = ("step",) + ACC_KEYS + ("kl_to_base", "val_new", "val_old_drop")


def _stat(vals: list[float]) -> dict | None:
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "spread": float((max(vals) - min(vals)) / 2)}


def _point_figures(report: Mapping, p: Mapping) -> dict[str, float]:
    out = {k: float(p[k]) for k in SUMMARY_KEYS if k not in ("val_old_drop",)}
    out["val_old_drop"] = val_drop(report, p)
    return out


def summary_table(reports: list[dict]) -> tuple[str, dict]:
    """Mean and spread (half the min-max range) over seeds: (markdown, JSON-able data).

    Selected figures: per method over the seeds where it qualifies only (``n_qualifying`` of
    ``n_seeds``; figures None when it never does). End-of-budget figures over every seed the
    method ran. Base, in-context and open book over every seed.
    """
    if not reports:
        raise ValueError("summary_table needs at least one report")
    for r in reports:
        check(r)
    drops = {float(r["max_old_drop"]) for r in reports}
    if len(drops) > 1:
        raise ValueError(f"the seeds used different max_old_drop values: {sorted(drops)}")
    max_old_drop = drops.pop()
    names: list[str] = []
    for r in reports:
        names += [m for m in r["methods"] if m not in names]

    def stats(points: list[dict]) -> dict | None:
        if not points:
            return None
        return {k: _stat([p[k] for p in points]) for k in points[0]}

    data: dict = {"seeds": [r["seed"] for r in reports], "max_old_drop": max_old_drop,
                  "base": stats([{k: float(r["base"][k]) for k in
                                  ACC_KEYS + ("kl_to_base", "val_new", "val_old")}
                                 for r in reports]),
                  "in_context": stats([{k: float(r["in_context"][k]) for k in
                                        ("closed_new_near", "closed_new_far")}
                                       for r in reports]),
                  "open_book": stats([{k: float(r["base"][k]) for k in
                                       ("open_new_near", "open_new_far")} for r in reports]),
                  "selected": {}, "end": {}, "step_cost_x_sft": {},
                  "dominating": {str(r["seed"]): dominating(r) for r in reports}}
    for m in names:
        runs = [r for r in reports if m in r["methods"]]
        sel = [_point_figures(r, r["methods"][m]["selected"]) for r in runs
               if r["methods"][m]["selected"] is not None]
        data["selected"][m] = {"n_seeds": len(runs), "n_qualifying": len(sel),
                               "figures": stats(sel)}
        data["end"][m] = {"n_seeds": len(runs),
                          "figures": stats([_point_figures(r, r["methods"][m]["end"])
                                            for r in runs])}
        costs = [r["timing"][m]["step_s"] / r["sft_step_s"] for r in runs
                 if r.get("sft_step_s") and m in r["timing"]]
        data["step_cost_x_sft"][m] = _stat(costs)

    multi = len(reports) > 1

    def cell(d: dict | None, key: str, kind: str) -> str:
        if d is None or d.get(key) is None:
            return DASH
        s = d[key]
        if kind == "step":
            return f"{s['mean']:.0f}" + (f" ± {s['spread']:.0f}" if multi else "")
        if kind == "kl":
            return f"{s['mean']:.3f}" + (f" ± {s['spread']:.3f}" if multi else "")
        return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['spread']:.1f}" if multi else "")

    kinds = {"step": "step", "kl_to_base": "kl"}
    header = ("| method | seeds | step | NEW near | NEW far | OLD near | OLD far | KL to base | "
              "val NEW | val OLD drop |")
    rule = "|---" * 10 + "|"

    def row(name: str, seeds: str, d: dict | None) -> str:
        return (f"| {name} | {seeds} | "
                + " | ".join(cell(d, k, kinds.get(k, "acc")) for k in SUMMARY_KEYS) + " |")

    n = len(reports)
    b = dict(data["base"])
    b["val_old_drop"] = {"mean": 0.0, "spread": 0.0}
    thr = _threshold_text(max_old_drop)
    spread = " ± spread (half the min-max range)" if multi else ""
    lines = [f"# Sleep demo over {n} seed(s) ({', '.join(str(s) for s in data['seeds'])})", "",
             f"Closed-book exact match (%) on held-out test wordings, mean{spread} over seeds; "
             "val OLD drop in points. The selected checkpoint is chosen on validation wordings "
             f"(highest val NEW with val OLD drop <= {thr}).", "",
             "## Selected checkpoint (validation rule)", "",
             "*seeds* = seeds where the method qualifies / seeds run; a method's means are over "
             "its qualifying seeds only.", "", header, rule,
             row("base (before sleep)", f"{n}/{n}", b),
             row("in-context", f"{n}/{n}", data["in_context"]),
             row("open book (teacher's level)", f"{n}/{n}",
                 {"closed_new_near": data["open_book"]["open_new_near"],
                  "closed_new_far": data["open_book"]["open_new_far"]})]
    for m in names:
        s = data["selected"][m]
        lines.append(row(m, f"{s['n_qualifying']}/{s['n_seeds']}", s["figures"]))
    lines += ["", "## End of budget", "", header, rule, row("base (before sleep)", f"{n}/{n}", b)]
    for m in names:
        e = data["end"][m]
        lines.append(row(m, f"{e['n_seeds']}/{e['n_seeds']}", e["figures"]))
    lines += ["", "## Step cost", "",
              "Typical training step time over one SFT step (LM loss) of the grown model on "
              "the seeding batch shape.", "", "| method | x SFT step |", "|---|---|"]
    for m in names:
        c = data["step_cost_x_sft"][m]
        lines.append(f"| {m} | " + (DASH if c is None else f"{c['mean']:.2f}x"
                                      + (f" ± {c['spread']:.2f}" if multi else "")) + " |")
    lines += ["", "Dominating method on validation per seed: "
              + "; ".join(f"seed {s}: {d or 'none'}" for s, d in data["dominating"].items())]
    return "\n".join(lines), data
