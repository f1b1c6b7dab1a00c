"""``sleep-jax sleep``: Knowledge Seeding on your own checkpoint, memories and probes.

  sleep-jax sleep --checkpoint CKPT --memories M.jsonl --probes P.jsonl --workdir DIR

1. Load the checkpoint (A's format) and the JSONL memories/probes (B's formats).
2. Seeding prompts come from the memories themselves, never from the probes: every sentence of
   a memory cut after its 2nd..(n-1)th word is a continuation prompt (the teacher reads the
   memory first, the student only the prefix). Any prompt that contains a probe question is
   dropped, and the count is reported. Replay prompts come from the model itself: prefixes of
   texts it samples unconditionally (no labels), answered by the pre-sleep model.
3. Grow (one low-rank expert slot per layer, activated, exact), seed only the new parameters.
4. Evaluate closed-book before/after and open-book (memory in context) on the probes, and
   write DIR/report.json, DIR/report.md and the grown checkpoint DIR/model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import numpy as np

from sleep_jax.distill import seeding

DEFAULT_FORMAT = "question: {question} answer:"


def memory_prompts(text: str, max_per_memory: int = 24) -> list[str]:
    """Continuation prompts cut from each sentence of a memory (after word 2..n-1)."""
    out = []
    for sent in re.split(r"(?<=[.!?])\s+", text.strip()):
        words = sent.split()
        out += [" ".join(words[:k]) for k in range(2, len(words))]
    return out[:max_per_memory]


def drop_probe_overlap(prompts: list[str], questions: list[str]) -> tuple[list[str], int]:
    """Remove prompts that contain (or equal) a probe question, case-insensitively."""
    qs = [q.strip().lower() for q in questions]
    keep = [p for p in prompts if not any(q and q in p.lower() for q in qs)]
    return keep, len(prompts) - len(keep)


def _parse(argv):
    p = argparse.ArgumentParser(prog="sleep-jax sleep", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (sleep-jax import)")
    p.add_argument("--memories", required=True, help='JSONL {"id", "text"}')
    p.add_argument("--probes", required=True, help='JSONL {"memory_id", "question", "answers"}')
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--expert-rank", type=int, default=64)
    p.add_argument("--replay-fraction", type=float, default=0.5)
    p.add_argument("--divergence", default="jsd", help="forward_kl | reverse_kl | jsd")
    p.add_argument("--lam", type=float, default=0.5, help="fraction of student-sampled rows")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--prompt-format", default=DEFAULT_FORMAT,
                   help="how a probe question is asked (default %(default)r)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    from sleep_jax.data.jsonl import JsonlError, read_memories, read_probes
    from sleep_jax.models.checkpoint_dir import CheckpointError, load_checkpoint

    try:
        memories = read_memories(a.memories)
        probes = read_probes(a.probes, memory_ids={m.id for m in memories})
        base, tok, meta = load_checkpoint(a.checkpoint)
        if tok is None:
            raise ValueError(f"checkpoint {a.checkpoint!r} has no tokenizer.json; sleep needs "
                             "one to read memories")
        scfg = seeding.SeedingConfig(divergence=a.divergence, lam=a.lam,
                                     max_new_tokens=a.max_new_tokens)
        if not 0.0 <= a.replay_fraction < 1.0:
            raise ValueError(f"--replay-fraction={a.replay_fraction} must be in [0, 1)")
    except (JsonlError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"sleep-jax sleep: {e}", file=sys.stderr)
        return 2
    report = run_sleep(a, base, tok, meta, memories, probes, scfg)
    print(json.dumps({k: report[k] for k in ("before", "after", "open_book")}, indent=2))
    return 0


def run_sleep(a, base, tok, meta, memories, probes, scfg) -> dict:
    """The sleep run behind the CLI (see module docstring)."""
    import optax

    from sleep_jax.eval import probes as probe_eval
    from sleep_jax.grow import activate_slot, grow_model
    from sleep_jax.mesh import make_mesh
    from sleep_jax.models.checkpoint_dir import save_checkpoint
    from sleep_jax.sampling import generate
    from sleep_jax.train.state import create_train_state, fresh_copy

    os.makedirs(a.workdir, exist_ok=True)
    tokens = meta["tokens"]
    bos, eos, pad = tokens.get("bos_id"), tokens.get("eos_id"), tokens.get("pad_id") or 0
    bos = bos if bos is not None else pad
    enc = lambda s: tok.encode(s).ids
    rng = np.random.default_rng(a.seed)
    questions = [pr.question for pr in probes]

    rows, dropped = [], 0
    for m in memories:
        ps, d = drop_probe_overlap(memory_prompts(m.text), questions)
        dropped += d
        rows += [(enc(m.text + " "), enc(p)) for p in ps]
    if not rows:
        raise SystemExit("sleep-jax sleep: no seeding prompts could be cut from the memories")
    # replay prompts: prefixes of the model's own unconditional samples
    n_rep = 64
    out = generate(base, np.full((n_rep, 1), bos, np.int32), np.ones(n_rep, np.int32),
                   jax.random.key(a.seed), max_new_tokens=16, temperature=1.0, eos_id=eos,
                   pad_id=pad)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    replay = [([], [int(t) for t in toks[i, :max(1, min(int(lens[i]) - 1, 8))]])
              for i in range(n_rep) if lens[i] > 1]

    B = a.batch_size
    n_old = int(round(a.replay_fraction * B)) if replay else 0
    P = max(len(m) + len(p) for m, p in rows + replay) + 1
    Q = max(len(p) for _, p in rows + replay) + 1

    def batches():
        while True:
            pick = [rows[i] for i in rng.integers(0, len(rows), B - n_old)]
            pick += [replay[i] for i in rng.integers(0, len(replay), n_old)] if n_old else []
            pick = [pick[i] for i in rng.permutation(B)]
            yield seeding.make_batch([m for m, _ in pick], [p for _, p in pick], bos_id=bos,
                                     teacher_len=P, student_len=Q, pad_id=pad)

    cfg = base.config
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    dst = cfg.replace(expert_slots=max(cfg.expert_slots, 1), expert_rank=a.expert_rank
                      if cfg.expert_slots == 0 else cfg.expert_rank)
    k1, k2 = jax.random.split(jax.random.key(a.seed + 1))
    grown, _ = grow_model(base, cfg, dst, mesh=mesh, rng=k1)
    grown, mask = activate_slot(grown, None, dst.expert_slots - 1, k2)
    state = create_train_state(fresh_copy(grown), optax.adam(a.lr))
    state, times = seeding.run_seeding(state, base, batches(), a.steps, mesh=mesh, cfg=scfg,
                                       eos_id=eos, pad_id=pad, mask=mask,
                                       rng=jax.random.key(a.seed + 2))
    student = state.model()

    kw = dict(bos_id=bos if tokens.get("add_bos", True) else None, eos_id=eos, pad_id=pad,
              max_new_tokens=8)
    fmt = lambda q: a.prompt_format.format(question=q)
    golds = [list(pr.answers) for pr in probes]
    closed = [fmt(q) for q in questions]
    by_id = {m.id: m.text for m in memories}
    opened = [by_id[pr.memory_id] + " " + fmt(pr.question) for pr in probes]
    before = probe_eval.qa_scores(base, tok, closed, golds, **kw)
    after = probe_eval.qa_scores(student, tok, closed, golds, **kw)
    open_book = probe_eval.qa_scores(base, tok, opened, golds, **kw)
    save_checkpoint(os.path.join(a.workdir, "model"), student, tok, tokens=tokens,
                    extra={"grown_from": os.path.abspath(a.checkpoint), "sleep": vars(a)})
    strip = lambda s: {k: v for k, v in s.items() if k != "predictions"}
    report = {"before": strip(before), "after": strip(after), "open_book": strip(open_book),
              "seeding_prompts": len(rows), "dropped_for_probe_overlap": dropped,
              "replay_prompts": len(replay), "steps": a.steps,
              "step_s": float(np.median(times[2:])) if len(times) > 3 else None,
              "args": vars(a), "predictions_after": after["predictions"]}
    with open(os.path.join(a.workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(a.workdir, "report.md"), "w") as f:
        f.write("# Sleep report\n\n| probes | EM | F1 |\n|---|---|---|\n")
        for name, s in (("closed book, before", before), ("closed book, after", after),
                        ("open book (teacher)", open_book)):
            f.write(f"| {name} | {s['em']:.3f} | {s['f1']:.3f} |\n")
        f.write(f"\n{len(rows)} seeding prompts from the memories ({dropped} dropped for "
                f"overlapping a probe), {len(replay)} replay prompts, {a.steps} steps.\n")
    return report
