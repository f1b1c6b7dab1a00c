"""Wake/sleep cycle reports: report.json, report.md and PNGs from each method's accuracy matrix.

Input, per method (``build``): ``matrix``, the (T+1) x T accuracy matrix of
``sleep_jax.eval.matrix`` (row k = 0..T before any sleep / after cycle k, column j = memory set
j; NaN or None = not measured); ``kl_to_base``, T figures KL(base || model) on general text
after each cycle; ``time_s``, T wall-clock seconds per cycle; optionally ``old``, T + 1 figures of
closed-book accuracy on the wake knowledge (OLD probes: before any sleep, then after each
cycle); optionally ``open_book``, T figures: each set with its own memory in context before
any sleep (the teacher's level). KL, time and OLD entries may be missing too (NaN / None).
Methods may have different T.

Output (``write_report``, every file atomic via ``sleep_jax.atomic``):
- report.json: the report dict of ``build``: per method its inputs, a ``summary`` (acc, bwt,
  fwt, forgetting, learning_acc of ``matrix.continual_metrics``; final_kl = KL after the last
  cycle; time_per_cycle_s = mean of the measured cycle times; old_before / old_after = OLD
  accuracy before any sleep / after the last cycle) and ``curves`` over cycles k = 1..T
  (acc = ACC of the matrix prefix after cycle k, the mean over the sets learned so far; bwt
  likewise; old and kl_to_base as given); open_book = the mean of the given open-book
  figures. Missing / undefined figures are JSON null.
- report.md: one table methods x {ACC, BWT, FWT, forgetting, learning accuracy, final KL,
  time/cycle}, then each method's matrix as a table, "-" where not measured or undefined.
  Accuracies are fractions in [0, 1].
- matrix_<method>.png: the heatmap of each method's matrix, values annotated, missing entries
  hatched; cycle_curves.png: ACC-so-far, BWT-so-far and KL to base over cycles, the methods
  side by side in each panel (colours from ``report.method_colours``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np

from sleep_jax.atomic import atomic_open, write_json, write_text
from sleep_jax.eval import matrix as mx
from sleep_jax.eval.report import method_colours

SUMMARY = (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting"),
           ("learning_acc", "learning acc"), ("open_book", "open book"),
           ("old_before", "OLD before"),
           ("old_after", "OLD after"), ("final_kl", "final KL"),
           ("time_per_cycle_s", "time/cycle (s)"))
CURVES = (("acc", "ACC so far (sets learned so far)"), ("bwt", "BWT so far"),
          ("old", "OLD closed-book (wake knowledge)"),
          ("kl_to_base", "KL(base || model), general text"))
CURVES_PNG = "cycle_curves.png"
MISSING = "-"


def _json_num(x) -> float | None:
    """float, or None for NaN / None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _as_float(x) -> float:
    return math.nan if x is None else float(x)


def _per_cycle(name: str, key: str, values, T: int) -> list[float]:
    """A length-T list of finite non-negative figures or NaN (missing); ValueError otherwise."""
    v = [_as_float(x) for x in values]
    if len(v) != T:
        raise ValueError(f"method {name!r}: {key} has {len(v)} entries; its matrix has T = {T} "
                         f"cycles, one entry per cycle is needed (NaN/None = not measured)")
    for k, x in enumerate(v, 1):
        if math.isinf(x) or x < 0:
            raise ValueError(f"method {name!r}: {key} after cycle {k} is {x!r}; allowed: a "
                             f"finite figure >= 0, or NaN/None for not measured")
    return v


def method_entry(name: str, m: Mapping) -> dict:
    """One method's report entry (module docstring) from its matrix, kl_to_base and time_s."""
    for key in ("matrix", "kl_to_base", "time_s"):
        if key not in m:
            raise ValueError(f"method {name!r} has no {key!r}; needed: matrix, kl_to_base, "
                             f"time_s")
    r = mx.as_matrix(m["matrix"])
    T = r.shape[1]
    kl = _per_cycle(name, "kl_to_base", m["kl_to_base"], T)
    times = _per_cycle(name, "time_s", m["time_s"], T)
    measured = [t for t in times if not math.isnan(t)]
    old = [_as_float(x) for x in m.get("old") or [None] * (T + 1)]
    if len(old) != T + 1:
        raise ValueError(f"method {name!r}: old has {len(old)} entries; T + 1 = {T + 1} are "
                         "needed (before any sleep, then after each cycle)")
    summary = dict(mx.continual_metrics(r))
    summary["old_before"], summary["old_after"] = old[0], old[-1]
    ob = [_as_float(x) for x in m.get("open_book") or []]
    if ob and len(ob) != T:
        raise ValueError(f"method {name!r}: open_book has {len(ob)} entries; T = {T} sets")
    ob = [x for x in ob if not math.isnan(x)]
    summary["open_book"] = float(np.mean(ob)) if ob else math.nan
    summary["final_kl"] = kl[-1]
    summary["time_per_cycle_s"] = float(np.mean(measured)) if measured else math.nan
    curves = {"acc": mx.curve(r, mx.average_accuracy), "bwt": mx.curve(r, mx.backward_transfer),
              "old": old[1:], "kl_to_base": kl}
    return {
        "cycles": T,
        "matrix": [[_json_num(x) for x in row] for row in r],
        "kl_to_base": [_json_num(x) for x in kl],
        "time_s": [_json_num(x) for x in times],
        "old": [_json_num(x) for x in old],
        "summary": {k: _json_num(v) for k, v in summary.items()},
        "curves": {k: [_json_num(x) for x in v] for k, v in curves.items()},
    }


def build(methods: Mapping[str, Mapping]) -> dict:
    """The report dict (JSON-ready: missing figures are None) of ``{method: {matrix,
    kl_to_base, time_s}}``, methods in the given (display) order."""
    if not methods:
        raise ValueError("no methods to report; give {method: {matrix, kl_to_base, time_s}}")
    return {"methods": {str(n): method_entry(str(n), m) for n, m in methods.items()},
            "units": "accuracies: fractions in [0, 1]; KL: nats per token; time: seconds; "
                     "null: not measured or undefined"}


# ----------------------------------------------------------------------------- markdown
def _cell(x, fmt: str) -> str:
    return MISSING if x is None else format(x, fmt)


SUMMARY_FORMATS = {"acc": ".4f", "bwt": "+.4f", "fwt": "+.4f", "forgetting": ".4f",
                   "learning_acc": ".4f", "open_book": ".4f", "old_before": ".3f",
                   "old_after": ".3f",
                   "final_kl": ".4g", "time_per_cycle_s": ".1f"}


def row_label(k: int) -> str:
    return "before any sleep" if k == 0 else f"after cycle {k}"


def markdown(report: Mapping) -> str:
    """report.md: the summary table, then each method's matrix (``-`` = not measured)."""
    methods = report["methods"]
    lines = ["# Wake/sleep cycle report", "",
             "Accuracies are closed-book fractions in [0, 1]; `-` = not measured or undefined. "
             "ACC, BWT, FWT: Lopez-Paz & Ranzato 2017 (GEM); forgetting: Chaudhry et al. 2018; "
             "learning accuracy: Riemer et al. 2019 (definitions in sleep_jax/eval/matrix.py). "
             "Open book: each set with its own memory in context, before any sleep (the mean "
             "over sets). OLD before / after: closed-book accuracy on the wake knowledge before "
             "any sleep / after the last cycle. Final KL: KL(base || model) on general text "
             "after the last cycle.", "",
             "| method | cycles | " + " | ".join(h for _, h in SUMMARY) + " |",
             "|---" * (len(SUMMARY) + 2) + "|"]
    for name, e in methods.items():
        cells = [_cell(e["summary"][k], SUMMARY_FORMATS[k]) for k, _ in SUMMARY]
        lines.append(f"| {name} | {e['cycles']} | " + " | ".join(cells) + " |")
    lines.append("")
    files = png_names(methods)
    for name, e in methods.items():
        T = e["cycles"]
        lines += [f"## {name}: accuracy matrix", "",
                  "rows: the model before any sleep / after each cycle; columns: memory sets.",
                  "", "| | " + " | ".join(f"set {j}" for j in range(1, T + 1)) + " |",
                  "|---" * (T + 1) + "|"]
        for k, row in enumerate(e["matrix"]):
            lines.append(f"| {row_label(k)} | " + " | ".join(_cell(x, ".3f") for x in row)
                         + " |")
        lines += ["", f"![{name} accuracy matrix]({files[name]})", ""]
    lines += ["## Over the cycles", "", f"![ACC, BWT and KL over cycles]({CURVES_PNG})", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- plots
def png_names(methods) -> dict[str, str]:
    """{method: its heatmap file name}, matrix_<method>.png with the name made file-safe and
    unique."""
    out, used = {}, {CURVES_PNG}
    for name in methods:
        base = "matrix_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "method")
        f, i = base + ".png", 2
        while f in used:
            f, i = f"{base}_{i}.png", i + 1
        used.add(f)
        out[name] = f
    return out


def heatmap(name: str, entry: Mapping):
    """One method's matrix as a heatmap figure: values annotated, missing entries hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    r = np.array([[np.nan if x is None else x for x in row] for row in entry["matrix"]],
                 dtype=np.float64)
    T = r.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.75 * T), max(3.5, 1.2 + 0.5 * (T + 1))))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(r), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for k in range(T + 1):
        for j in range(T):
            v = r[k, j]
            if math.isnan(v):
                ax.add_patch(Rectangle((j - 0.5, k - 0.5), 1, 1, facecolor="#f0f0f0",
                                       edgecolor="#a0a0a0", hatch="///", lw=0.0))
            else:
                ax.text(j, k, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")
            if k == j + 1:                                  # R[j, j]: right after learning j
                ax.add_patch(Rectangle((j - 0.5, k - 0.5), 1, 1, fill=False, edgecolor="red",
                                       lw=1.2))
    ax.set_xticks(range(T), [f"set {j}" for j in range(1, T + 1)], fontsize=8)
    ax.set_yticks(range(T + 1), ["before"] + [f"cycle {k}" for k in range(1, T + 1)],
                  fontsize=8)
    ax.set_xlabel("memory set")
    ax.set_ylabel("model")
    ax.set_title(f"{name}: closed-book accuracy\n(hatched = not measured, red = the cycle that "
                 f"learned the set)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def curves_figure(report: Mapping):
    """ACC-so-far, BWT-so-far and KL to base over cycles, one panel each, methods side by
    side (NaN = gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    colour = method_colours(list(methods))
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.8))
    for ax, (key, title) in zip(axes, CURVES):
        for name, e in methods.items():
            ys = [np.nan if y is None else y for y in e["curves"][key]]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=4, color=colour[name],
                    label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("cycle")
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("closed-book accuracy")
    axes[2].set_ylabel("closed-book accuracy")
    axes[3].set_ylabel("nats per token")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures(report: Mapping) -> dict[str, object]:
    """{file name: matplotlib figure}: each method's heatmap and the curves."""
    files = png_names(report["methods"])
    figs = {files[n]: heatmap(n, e) for n, e in report["methods"].items()}
    figs[CURVES_PNG] = curves_figure(report)
    return figs


def write_report(report: Mapping, workdir: str) -> list[str]:
    """Writes report.json, report.md and the PNGs into ``workdir``, each atomically (json
    first, so the figures survive a failing plot); returns the paths written."""
    import matplotlib.pyplot as plt

    paths = [write_json(os.path.join(workdir, "report.json"), report, allow_nan=False),
             write_text(os.path.join(workdir, "report.md"), markdown(report))]
    for fname, fig in figures(report).items():
        paths.append(os.path.join(workdir, fname))
        with atomic_open(paths[-1], "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
    return paths
