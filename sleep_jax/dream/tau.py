"""tau, the downstream measure a dream is rewarded on: closed-book questions with candidates.

A ``Tau`` holds Q questions about one context (no context in the prompt), each with K candidate
answers: the correct one and the answers of the other entities for the same attribute. The
measure of a model on question q is the *contrastive* log-probability

    c_q = log p(a*_q | prompt_q) - logsumexp_k log p(a_qk | prompt_q),

the log-softmax of the correct answer among the candidates (log p of a candidate = the sum of
its tokens' log-probs). Raising the probability of every answer word alike leaves c_q
unchanged, so a dream earns nothing by repeating answer words without binding them to the
question. Data discipline: in training tau is built from TASK entities and the "task" wording
only (``world_tau`` refuses anything else); no evaluation or validation wording enters it.

Shapes: Q questions, P prompt width, K candidates, A answer width (tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sleep_jax.sampling import score


@struct.dataclass
class Tau:
    """prompt [Q,P] int32 right-padded, prompt_len [Q]; answers [Q,K,A] int32, answer_mask
    [Q,K,A] bool (a candidate with no True token is padding: K may exceed a question's real
    candidates); correct [Q] int32, the index of the right candidate."""

    prompt: jax.Array
    prompt_len: jax.Array
    answers: jax.Array
    answer_mask: jax.Array
    correct: jax.Array


def candidate_logprobs(model, tau: Tau) -> jax.Array:
    """log p(candidate k | prompt q) [Q,K] in one forward pass of Q*K rows; -inf for padding
    candidates."""
    Q, K, A = tau.answers.shape
    prompts = jnp.repeat(tau.prompt, K, axis=0)
    lens = jnp.repeat(tau.prompt_len, K, axis=0)
    lp = score(model, prompts, lens, tau.answers.reshape(Q * K, A),
               tau.answer_mask.reshape(Q * K, A))
    lp = jnp.sum(lp, -1).reshape(Q, K)
    return jnp.where(jnp.any(tau.answer_mask, -1), lp, -jnp.inf)


def contrastive_from(lp_qk: jax.Array, correct_q: jax.Array) -> jax.Array:
    """c_q [...,Q] from candidate log-probs [...,Q,K] and correct [Q] (leading axes kept)."""
    idx = jnp.broadcast_to(correct_q[..., None], lp_qk.shape[:-1] + (1,))
    right = jnp.take_along_axis(lp_qk, idx, -1)[..., 0]
    return right - jax.nn.logsumexp(lp_qk, -1)


def accuracy_from(lp_qk: jax.Array, correct_q: jax.Array) -> jax.Array:
    """[...,Q] float: 1 where the correct candidate has the highest log-prob (a multiple-choice
    exact match; ties go to the lower index)."""
    right = jnp.broadcast_to(correct_q, lp_qk.shape[:-1])
    return (jnp.argmax(lp_qk, -1) == right).astype(jnp.float32)


def contrastive_logprob(model, tau: Tau) -> jax.Array:
    """c_q [Q]: the log-softmax of the correct candidate among question q's candidates."""
    return contrastive_from(candidate_logprobs(model, tau), tau.correct)


def accuracy(model, tau: Tau) -> jax.Array:
    """[Q] float: multiple-choice exact match of ``model`` on tau (``accuracy_from``)."""
    return accuracy_from(candidate_logprobs(model, tau), tau.correct)


def make_tau(encode: Callable[[str], Sequence[int]], prompts: Sequence[str],
             candidates: Sequence[Sequence[str]], correct: Sequence[int], *, bos_id=None,
             pad_id: int = 0, n_candidates: int | None = None) -> Tau:
    """A ``Tau`` from texts (host side).

    Args:
      encode: text -> token ids (no specials added).
      prompts: Q prompt texts (e.g. ``world.closed_book_prompt(question)``).
      candidates: per question its candidate answers (each a text, spaced as in training:
        " oslo"), the correct one among them.
      correct: per question the index of the correct candidate.
      bos_id: prepended to every prompt when given.
      n_candidates: K (default: the most candidates of any question).
    """
    Q = len(prompts)
    if not Q or len(candidates) != Q or len(correct) != Q:
        raise ValueError(f"make_tau needs Q >= 1 prompts with as many candidate lists and "
                         f"correct indices, got {Q}, {len(candidates)}, {len(correct)}")
    for q, (cands, c) in enumerate(zip(candidates, correct)):
        if not 0 <= c < len(cands):
            raise ValueError(f"question {q}: correct index {c} outside its {len(cands)} "
                             f"candidates")
    head = [] if bos_id is None else [bos_id]
    p_ids = [head + list(encode(p)) for p in prompts]
    a_ids = [[list(encode(a)) for a in cands] for cands in candidates]
    K = n_candidates or max(len(c) for c in a_ids)
    if K < max(len(c) for c in a_ids):
        raise ValueError(f"n_candidates={K} is below a question's {max(len(c) for c in a_ids)}")
    P = max(len(p) for p in p_ids)
    A = max(len(a) for c in a_ids for a in c)
    if A == 0:
        raise ValueError("every candidate answer encodes to no tokens")
    prompt = np.full((Q, P), pad_id, np.int32)
    answers = np.full((Q, K, A), pad_id, np.int32)
    amask = np.zeros((Q, K, A), bool)
    for q in range(Q):
        prompt[q, :len(p_ids[q])] = p_ids[q]
        for k, a in enumerate(a_ids[q]):
            answers[q, k, :len(a)] = a
            amask[q, k, :len(a)] = True
    return Tau(jnp.asarray(prompt), jnp.asarray([len(p) for p in p_ids], jnp.int32),
               jnp.asarray(answers), jnp.asarray(amask), jnp.asarray(correct, jnp.int32))


def world_tau(world, entity, encode, *, bos_id=None, pad_id: int = 0) -> Tau:
    """tau of one TASK entity of a ``data.world.World``: its four attributes asked closed-book in
    the "task" wording; the candidates of an attribute are the distinct values the TASK
    entities hold for it (the correct first). Refuses a non-TASK entity: no OLD/NEW fact and no
    evaluation or validation wording may enter dreaming's training."""
    from sleep_jax.data import world as W

    task = world.entities("task")
    if entity.id not in {e.id for e in task}:
        raise ValueError(f"world_tau takes TASK entities only (dreaming trains on them alone), "
                         f"got {entity.id!r}")
    prompts, cands, correct = [], [], []
    for a in W.ATTRIBUTES:
        right = entity.attributes[a]
        others = sorted({e.attributes[a] for e in task} - {right})
        prompts.append(W.closed_book_prompt(W.question(entity, a, W.TASK_WORDING)))
        cands.append([" " + v for v in [right] + others])
        correct.append(0)
    K = max(len(c) for c in cands)
    return make_tau(encode, prompts, cands, correct, bos_id=bos_id, pad_id=pad_id,
                    n_candidates=K)
