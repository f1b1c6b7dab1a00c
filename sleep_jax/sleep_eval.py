"""A sleep's evaluation (``sleep.sleep_checkpoint``): how a probe is asked (the prompt format,
the memory first when open book, the chat template), closed-book before/after and open-book
scores, scores per probe split, and retention on general questions. Host-side orchestration
of ``eval.probes``; the config is ``sleep.SleepConfig`` (read, not imported).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sleep_jax.sleep_rows import chat_parts

if TYPE_CHECKING:
    from sleep_jax.sleep import SleepConfig


# Below this open-book EM the teacher (the model reading the memory) answers too few probes
# for seeding to have much to consolidate: ``sleep_checkpoint`` warns before training.
LOW_OPEN_BOOK_EM = 0.3


def _probe_kw(tokens: Mapping, cfg: SleepConfig) -> dict:
    return dict(bos_id=tokens.get("bos_id") if tokens.get("add_bos", True) else None,
                eos_id=tokens.get("eos_id"), pad_id=tokens.get("pad_id") or 0,
                max_new_tokens=cfg.eval_tokens, cut=cfg.answer_cut)


def probe_prompt(question: str, *, cfg: SleepConfig, tokens: Mapping, tokenizer,
                 memory: str | None = None) -> str:
    """How a probe is asked: ``cfg.prompt_format``, after the memory (open book, as the
    teacher reads it) when one is given, inside the chat template with ``cfg.chat``."""
    text = cfg.prompt_format.format(question=question)
    if memory is not None:
        text = memory + cfg.memory_separator + text
    if cfg.chat:
        head, tail = chat_parts(tokens, tokenizer)
        text = head + text + tail
    return text


def open_book_scores(base, tokenizer, memories, probes, *, tokens: Mapping,
                     cfg: SleepConfig) -> dict:
    """Open-book EM/F1 (and predictions): ``base`` answers each probe with its memory in
    context, as the teacher reads it."""
    from sleep_jax.eval import probes as probe_eval

    by_id = {m.id: m.text for m in memories}
    opened = [probe_prompt(pr.question, cfg=cfg, tokens=tokens, tokenizer=tokenizer,
                           memory=by_id[pr.memory_id]) for pr in probes]
    return probe_eval.qa_scores(base, tokenizer, opened, [list(pr.answers) for pr in probes],
                                **_probe_kw(tokens, cfg))


def evaluate_probes(model, base, tokenizer, memories, probes, *, tokens: Mapping,
                    cfg: SleepConfig, open_book: dict | None = None) -> dict:
    """Closed-book before (base) / after (model) and open-book (base reads the memory) EM/F1;
    ``open_book``: its scores when already measured (``open_book_scores``)."""
    from sleep_jax.eval import probes as probe_eval

    kw = _probe_kw(tokens, cfg)
    golds = [list(pr.answers) for pr in probes]
    closed = [probe_prompt(pr.question, cfg=cfg, tokens=tokens, tokenizer=tokenizer)
              for pr in probes]
    if open_book is None:
        open_book = open_book_scores(base, tokenizer, memories, probes, tokens=tokens, cfg=cfg)
    return {"before": probe_eval.qa_scores(base, tokenizer, closed, golds, **kw),
            "after": probe_eval.qa_scores(model, tokenizer, closed, golds, **kw),
            "open_book": open_book}


def split_scores(probes, scores: Mapping) -> dict:
    """{split: {"before"|"after"|"open_book": {"em", "f1", "contains", "n"}}} for probes that
    name a split ({} when none does)."""
    from sleep_jax.eval import qa

    splits = sorted({pr.split for pr in probes if pr.split})
    out = {}
    for sp in splits:
        idx = [i for i, pr in enumerate(probes) if pr.split == sp]
        golds = [list(probes[i].answers) for i in idx]
        out[sp] = {k: qa.score([scores[k]["predictions"][i] for i in idx], golds)
                   for k in ("before", "after", "open_book")}
    return out


def retain_scores(model, base, tokenizer, questions, *, tokens: Mapping,
                  cfg: SleepConfig) -> dict:
    """General questions closed book before (base) and after (model): scores, and the share
    of the questions the base answers (``contains``) that the model still answers."""
    from sleep_jax.eval import probes as probe_eval
    from sleep_jax.eval import qa

    kw = _probe_kw(tokens, cfg)
    golds = [list(q.answers) for q in questions]
    asked = [probe_prompt(q.question, cfg=cfg, tokens=tokens, tokenizer=tokenizer)
             for q in questions]
    before = probe_eval.qa_scores(base, tokenizer, asked, golds, **kw)
    after = probe_eval.qa_scores(model, tokenizer, asked, golds, **kw)
    right = [i for i, (p, g) in enumerate(zip(before["predictions"], golds))
             if qa.contains_match(p, g)]
    kept = [i for i in right if qa.contains_match(after["predictions"][i], golds[i])]
    return {"n": len(questions), "base_right": len(right), "kept": len(kept),
            "retention": len(kept) / len(right) if right else float("nan"),
            "before": before, "after": after}
