"""The ``sleep-jax`` command: dispatches ``sleep-jax <command> ...`` to the command's module.

Each command lives with the concept it serves and exposes ``main(argv: list[str]) -> int``; the
module is imported only when its command runs, so ``sleep-jax --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("sleep_jax.demo", "main", "the CPU demo: train a tiny model, sleep, evaluate"),
    "train": ("sleep_jax.train.cli", "main", "train from a config (resumes in its workdir)"),
    "sleep": ("sleep_jax.distill.cli", "main", "Knowledge Seeding on your model and memories"),
    "example-data": ("sleep_jax.data.fictional", "main",
                     "write fictional facts, probes and a retention list (JSONL)"),
    "cycle": ("sleep_jax.cycle_cli", "main", "wake/sleep cycles over a memory stream"),
    "dream": ("sleep_jax.dream.cli", "main", "train a dream generator on a task set (JSONL)"),
    "grow": ("sleep_jax.grow.cli", "main", "grow a checkpoint (function preserving)"),
    "plan": ("sleep_jax.plan.cli", "main", "compile each step for TPU meshes: memory, roofline"),
    "import": ("sleep_jax.models.cli", "import_main", "import a GGUF or HF Llama checkpoint"),
    "export": ("sleep_jax.models.cli", "export_main", "export a checkpoint to HF safetensors"),
    "generate": ("sleep_jax.models.cli", "generate_main", "sample a completion"),
    "score": ("sleep_jax.models.cli", "score_main", "log-probs of a completion (JSON)"),
    "launch": ("sleep_jax.launch_cli", "main", "run a command as N local processes"),
    "devices": ("sleep_jax.launch_cli", "devices_main", "join the processes, print the devices"),
}


def usage() -> str:
    lines = ["usage: sleep-jax <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    lines += ["", "Run `sleep-jax <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sleep-jax: unknown command {name!r}; allowed: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"sleep-jax: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
