"""Rewards registered by name: (completions, references) -> float32 [B].

Text rewards score decoded completions against reference texts on the host (rewards are not
differentiated). Built in:

- ``exact_match``: SQuAD-normalised exact match (``sleep_jax.eval.qa``), in {0, 1}.
- ``f1``: SQuAD token F1 in [0, 1].
- ``levenshtein``: r_lev = 1 - d / max_len if d / max_len <= z0 else 0, with d the character
  edit distance (rapidfuzz) and max_len the longer string's length (two empty strings: 1).
- ``imitation``: the paper's Learning-to-Imitate reward gamma * r_sem + (1 - gamma) * r_lev
  (arXiv 2606.03979, Stage 1b), with r_sem in {0, 1} from a frozen judge (``JudgeReward``).

``register_reward(name)`` adds a user's reward; ``get_reward(name, **kw)`` binds its options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rapidfuzz.distance import Levenshtein

from sleep_jax.data.tokenizers import pad_rows
from sleep_jax.eval import qa

RewardFn = Callable[..., np.ndarray]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: register ``fn(completions, references, **options) -> [B] float32``."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str, **options) -> RewardFn:
    """The reward ``name`` with its options bound: ``fn(completions, references)``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return functools.partial(REWARDS[name], **options)


def _check(completions: Sequence, references: Sequence) -> None:
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")


@register_reward("exact_match")
def exact_match(completions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """1 where the normalised completion equals the normalised reference."""
    _check(completions, references)
    return np.array([qa.exact_match(c, [r]) for c, r in zip(completions, references)],
                    np.float32)


@register_reward("f1")
def token_f1(completions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """SQuAD token F1 of each completion against its reference."""
    _check(completions, references)
    return np.array([qa.f1_score(c, [r]) for c, r in zip(completions, references)], np.float32)


@register_reward("levenshtein")
def levenshtein(completions: Sequence[str], references: Sequence[str], *,
                z0: float = 0.5) -> np.ndarray:
    """r_lev = 1 - d/max_len when d/max_len <= z0, else 0 (d: character edit distance).

    Args:
      completions, references: B strings each.
      z0: the largest normalised distance that still earns a reward, in [0, 1].
    """
    if not 0.0 <= z0 <= 1.0:
        raise ValueError(f"z0={z0} must be in [0, 1]")
    _check(completions, references)
    out = np.zeros(len(completions), np.float32)
    for i, (c, r) in enumerate(zip(completions, references)):
        n = max(len(c), len(r))
        z = Levenshtein.distance(c, r) / n if n else 0.0
        out[i] = 1.0 - z if z <= z0 else 0.0
    return out


class JudgeReward:
    """r_sem in {0, 1}: a frozen model answers a yes/no "same meaning?" prompt.

    The judge reads ``template.format(a=completion, b=reference)`` and r_sem = 1 when
    log p(yes) > log p(no) for the next token. ``yes`` and ``no`` must each encode to exactly
    one token. Prompts are right-padded to a multiple of ``bucket`` tokens so few shapes compile.
    """

    DEFAULT_TEMPLATE = ('Do these two texts mean the same thing?\nA: {a}\nB: {b}\n'
                        'Answer yes or no:')

    def __init__(self, model: nnx.Module, tokenizer, *, template: str = DEFAULT_TEMPLATE,
                 yes: str = " yes", no: str = " no", bos_id: int | None = None,
                 pad_id: int = 0, bucket: int = 32):
        self.tokenizer, self.template = tokenizer, template
        self.bos_id, self.pad_id, self.bucket = bos_id, pad_id, bucket
        self.yes_id, self.no_id = (self._single_token(w) for w in (yes, no))
        graphdef, state = nnx.split(model)

        def logp(state, tokens, lengths):
            m = nnx.merge(graphdef, state)
            pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            logits = m(tokens, pos, mask=pos < lengths[:, None])[0]
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], 1)[:, 0]
            lp = jax.nn.log_softmax(last.astype(jnp.float32), -1)
            return lp[:, self.yes_id], lp[:, self.no_id]

        self._state = state
        self._logp = jax.jit(logp)

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"judge answer {word!r} encodes to {len(ids)} tokens {ids}; it must "
                             f"be exactly one token (pass yes=/no= words the tokenizer has)")
        return ids[0]

    def yes_no_logprobs(self, completions: Sequence[str], references: Sequence[str]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(log p(yes) [B], log p(no) [B]) for each (completion, reference) pair."""
        _check(completions, references)
        head = [] if self.bos_id is None else [self.bos_id]
        rows = [head + self.tokenizer.encode(self.template.format(a=c, b=r),
                                             add_special_tokens=False).ids
                for c, r in zip(completions, references)]
        toks, lens = pad_rows(rows, pad_id=self.pad_id, multiple=self.bucket, where="judge row")
        y, n = self._logp(self._state, toks, lens)
        return np.asarray(y), np.asarray(n)

    def __call__(self, completions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        y, n = self.yes_no_logprobs(completions, references)
        return (y > n).astype(np.float32)


@register_reward("judge")
def judge(completions: Sequence[str], references: Sequence[str], *,
          judge: JudgeReward) -> np.ndarray:
    """r_sem from a ``JudgeReward`` instance."""
    return judge(completions, references)


@register_reward("imitation")
def imitation(completions: Sequence[str], references: Sequence[str], *, gamma: float = 0.5,
              z0: float = 0.5, judge: JudgeReward | None = None) -> np.ndarray:
    """gamma * r_sem + (1 - gamma) * r_lev (arXiv 2606.03979, Learning to Imitate).

    ``judge`` may be None only when gamma == 0 (pure edit-distance reward).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must be in [0, 1]")
    r = (1.0 - gamma) * levenshtein(completions, references, z0=z0)
    if gamma > 0:
        if judge is None:
            raise ValueError(f"gamma={gamma} > 0 needs a judge (JudgeReward); pass judge= or "
                             f"set gamma=0")
        r = r + gamma * judge(completions, references)
    return r.astype(np.float32)
