"""Context alignment: the same completion seen by a teacher with privileged context and a student.

In Knowledge Seeding the teacher reads `memory + prompt + completion` and the student only
`prompt + completion` (context distillation into the grown model, Stage 1 of arXiv
2606.03979). Each row of a batch has its own lengths, so the completion starts at a different
index in every row and in each
of the two sequences. This module builds both right-padded token rows, records per row where each
completion token sits in the teacher's and in the student's sequence, and gathers the logits that
predict those tokens, giving teacher and student logits aligned token for token: [B,M,V] each,
with one completion mask [B,M].

Causal-LM convention: logits at index i predict the token at index i + 1, so the logits that
predict the completion token at index p are gathered from index p - 1 (every prefix must therefore
hold at least one token, e.g. BOS).

Two builders with the same output: `build_aligned_batch` (numpy, on the host, from Python lists of
ids) and `concat_rows` (pure jnp with fixed shapes, jit-able: for completions sampled on device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.data.tokenizers import pad_rows
from sleep_jax.distill import divergences


class Rows(NamedTuple):
    """Right-padded token rows with the positions of their completion tokens.

    tokens: [B,T] int32, prefix then completion then pad_id.
    positions: [B,T] int32, 0..T-1 (RoPE positions; pad slots keep counting, they are masked).
    valid: [B,T] bool, True on real (non-pad) tokens: the model's `mask` argument.
    completion_pos: [B,M] int32, index in `tokens` of completion token m (1 where padded, so a
      gather stays in range; mask it with `completion_mask`).
    completion_mask: [B,M] bool, True on real completion tokens.
    """

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array
    completion_pos: jax.Array
    completion_mask: jax.Array


class AlignedBatch(NamedTuple):
    """Teacher rows (memory + prompt + completion) and student rows (prompt + completion).

    teacher, student: `Rows` with [B,T_teacher] and [B,T_student] tokens; both share
    completion [B,M] int32 (the completion tokens, pad_id where masked) and
    completion_mask [B,M] bool. Being a NamedTuple of arrays it passes through jit as a pytree.
    """

    teacher: Rows
    student: Rows
    completion: jax.Array
    completion_mask: jax.Array


def _rows_np(prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
             length: int, completion_len: int, pad_id: int, side: str) -> Rows:
    B = len(prefixes)
    tokens = np.full((B, length), pad_id, np.int32)
    valid = np.zeros((B, length), bool)
    cpos = np.ones((B, completion_len), np.int32)
    cmask = np.zeros((B, completion_len), bool)
    for b, (pre, comp) in enumerate(zip(prefixes, completions)):
        n_pre, n_comp = len(pre), len(comp)
        if n_pre < 1:
            raise ValueError(f"{side} row {b}: the prefix is empty; it needs at least one token "
                             "(e.g. BOS) whose logits predict the first completion token")
        if n_pre + n_comp > length:
            raise ValueError(f"{side} row {b}: prefix {n_pre} + completion {n_comp} tokens = "
                             f"{n_pre + n_comp} > row length {length}; raise the length")
        tokens[b, :n_pre] = pre
        tokens[b, n_pre:n_pre + n_comp] = comp
        valid[b, :n_pre + n_comp] = True
        cpos[b, :n_comp] = np.arange(n_pre, n_pre + n_comp)
        cmask[b, :n_comp] = True
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (B, length)).copy()
    return Rows(tokens, positions, valid, cpos, cmask)


def build_aligned_batch(
    memories: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    bos_id: int | None = None,
    teacher_len: int | None = None,
    student_len: int | None = None,
    completion_len: int | None = None,
    student_prefixes: Sequence[Sequence[int]] | None = None,
) -> AlignedBatch:
    """Builds teacher rows [bos] + memory + prompt + completion and student rows [bos] + prompt +
    completion (host side, numpy), right-padded to fixed lengths.

    Fixed lengths (give them to keep jit from recompiling per batch) default to the batch maxima.
    Separators between memory and prompt, if any, belong to the pieces themselves.

    Args:
      memories: B lists of token ids, the privileged context only the teacher sees.
      prompts: B lists of token ids seen by both.
      completions: B lists of token ids (M_b <= M each), the tokens whose distributions are matched.
      pad_id: id written in pad slots.
      bos_id: if given, prepended to both rows.
      teacher_len, student_len: row lengths T_teacher, T_student (None: the batch maximum).
      completion_len: M (None: the longest completion).
      student_prefixes: if given, the student's prefixes replace [bos] + prompt (e.g. a rewritten
        prompt); the teacher still reads [bos] + memory + prompt.

    Returns:
      AlignedBatch of numpy arrays (jnp.asarray or device_put them).
    """
    B = len(prompts)
    if len(memories) != B or len(completions) != B:
        raise ValueError(f"memories, prompts and completions must have one entry per row; got "
                         f"{len(memories)}, {B}, {len(completions)}")
    head = [] if bos_id is None else [bos_id]
    t_pre = [head + list(m) + list(p) for m, p in zip(memories, prompts)]
    if student_prefixes is None:
        s_pre = [head + list(p) for p in prompts]
    else:
        if len(student_prefixes) != B:
            raise ValueError(f"student_prefixes has {len(student_prefixes)} rows, expected {B}")
        s_pre = [list(p) for p in student_prefixes]
    comps = [list(c) for c in completions]
    M = max((len(c) for c in comps), default=0) if completion_len is None else completion_len
    if any(len(c) > M for c in comps):
        raise ValueError(f"a completion has {max(len(c) for c in comps)} tokens > completion_len "
                         f"{M}")
    t_len = max((len(p) + len(c) for p, c in zip(t_pre, comps)), default=1)
    s_len = max((len(p) + len(c) for p, c in zip(s_pre, comps)), default=1)
    teacher = _rows_np(t_pre, comps, t_len if teacher_len is None else teacher_len, M, pad_id,
                       "teacher")
    student = _rows_np(s_pre, comps, s_len if student_len is None else student_len, M, pad_id,
                       "student")
    completion, _ = pad_rows(comps, pad_id=pad_id, width=M, where="completion")
    return AlignedBatch(teacher, student, completion, teacher.completion_mask.copy())


def concat_rows(prefix_bp: jax.Array, prefix_len_b: jax.Array, completion_bm: jax.Array,
                completion_mask_bm: jax.Array, *, pad_id: int = 0) -> Rows:
    """Joins right-padded prefixes and completions into rows of fixed length T = P + M (pure jnp).

    Row b is prefix_bp[b, :prefix_len_b[b]] + the masked-in completion tokens + pad_id. The
    completion mask must be left-aligned per row (real tokens first, as a sampler that pads after
    EOS gives). Static shapes only, so it jits once per (B, P, M).

    Args:
      prefix_bp: [B,P] int prefix tokens, right-padded.
      prefix_len_b: [B] int number of real prefix tokens, 1 <= len <= P.
      completion_bm: [B,M] int completion tokens.
      completion_mask_bm: [B,M] bool, True on real completion tokens (left-aligned).
      pad_id: id written in pad slots.

    Returns:
      Rows with [B,P+M] tokens/positions/valid and [B,M] completion_pos/completion_mask.
    """
    B, P = prefix_bp.shape
    M = completion_bm.shape[1]
    T = P + M
    prefix_len_b = prefix_len_b.astype(jnp.int32)
    cmask = completion_mask_bm.astype(bool)
    n_comp = jnp.sum(cmask, axis=1, dtype=jnp.int32)
    idx_t = jnp.arange(T, dtype=jnp.int32)
    pre = jnp.where(jnp.arange(P)[None, :] < prefix_len_b[:, None], prefix_bp, pad_id)
    tokens = jnp.full((B, T), pad_id, prefix_bp.dtype).at[:, :P].set(pre)
    raw_pos = prefix_len_b[:, None] + jnp.arange(M, dtype=jnp.int32)[None, :]  # [B,M], < T
    comp = jnp.where(cmask, completion_bm, pad_id).astype(tokens.dtype)
    # Padded completion slots scatter pad_id into slots that are padding anyway.
    tokens = tokens.at[jnp.arange(B)[:, None], raw_pos].set(comp)
    valid = idx_t[None, :] < (prefix_len_b + n_comp)[:, None]
    positions = jnp.broadcast_to(idx_t, (B, T))
    cpos = jnp.where(cmask, raw_pos, 1)
    return Rows(tokens.astype(jnp.int32), positions, valid, cpos, cmask)


def align_sampled(teacher_prefix_bp: jax.Array, teacher_prefix_len_b: jax.Array,
                  student_prefix_bq: jax.Array, student_prefix_len_b: jax.Array,
                  completion_bm: jax.Array, completion_mask_bm: jax.Array, *,
                  pad_id: int = 0) -> AlignedBatch:
    """`concat_rows` for both sides: an AlignedBatch from on-device pieces (pure jnp, jit-able).

    Args:
      teacher_prefix_bp: [B,P] right-padded [bos] + memory + prompt; teacher_prefix_len_b: [B].
      student_prefix_bq: [B,Q] right-padded [bos] + prompt; student_prefix_len_b: [B].
      completion_bm: [B,M] sampled completion; completion_mask_bm: [B,M] left-aligned bool.
      pad_id: id written in pad slots.

    Returns:
      AlignedBatch with [B,P+M] teacher rows and [B,Q+M] student rows.
    """
    teacher = concat_rows(teacher_prefix_bp, teacher_prefix_len_b, completion_bm,
                          completion_mask_bm, pad_id=pad_id)
    student = concat_rows(student_prefix_bq, student_prefix_len_b, completion_bm,
                          completion_mask_bm, pad_id=pad_id)
    comp = jnp.where(teacher.completion_mask, completion_bm, pad_id).astype(jnp.int32)
    return AlignedBatch(teacher, student, comp, teacher.completion_mask)


def gather_positions(x_bt: jax.Array, pos_bm: jax.Array) -> jax.Array:
    """x[b, pos[b, m]] for every (b, m): [B,T,...] -> [B,M,...]. Indices are clipped to [0, T)."""
    T = x_bt.shape[1]
    idx = jnp.clip(pos_bm.astype(jnp.int32), 0, T - 1)
    idx = idx.reshape(idx.shape + (1,) * (x_bt.ndim - 2))
    return jnp.take_along_axis(x_bt, idx, axis=1)


def gather_completion_logits(logits_btv: jax.Array, completion_pos_bm: jax.Array) -> jax.Array:
    """The logits that predict each completion token: logits[b, completion_pos[b, m] - 1].

    Args:
      logits_btv: [B,T,V] logits of a causal LM over rows built by this module.
      completion_pos_bm: [B,M] int index of each completion token in the row (>= 1).

    Returns:
      [B,M,V] logits; entries at masked-out completion slots are meaningless (mask them).
    """
    return gather_positions(logits_btv, completion_pos_bm - 1)


def aligned_logits(teacher_logits_btv: jax.Array, student_logits_btv: jax.Array,
                   batch: AlignedBatch) -> tuple[jax.Array, jax.Array]:
    """Teacher and student logits predicting the same completion tokens: ([B,M,V], [B,M,V])."""
    return (gather_completion_logits(teacher_logits_btv, batch.teacher.completion_pos),
            gather_completion_logits(student_logits_btv, batch.student.completion_pos))


def completion_divergence(name: str, student_logits_btv: jax.Array,
                          teacher_logits_btv: jax.Array, batch: AlignedBatch, *,
                          beta: float = 0.5,
                          temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """A divergence (see `divergences`) over the completion tokens of an aligned batch.

    Args:
      name: "forward_kl", "reverse_kl" or "jsd".
      student_logits_btv: [B,T_student,V] student logits over `batch.student.tokens`.
      teacher_logits_btv: [B,T_teacher,V] teacher logits over `batch.teacher.tokens`.
      batch: the AlignedBatch both were computed on.
      beta, temperature: as in `divergences.divergence`.

    Returns:
      (sum over completion tokens, number of completion tokens).
    """
    t_bmv, s_bmv = aligned_logits(teacher_logits_btv, student_logits_btv, batch)
    return divergences.divergence(name, s_bmv, t_bmv, batch.completion_mask, beta=beta,
                                  temperature=temperature)
