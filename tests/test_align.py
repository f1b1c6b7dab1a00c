"""Context alignment with rows of different lengths, checked element by element."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.distill import align

PAD, BOS = 0, 1
MEMORIES = [[10, 11], [12], [13, 14, 15]]
PROMPTS = [[20], [21, 22], [23]]
COMPLETIONS = [[30, 31, 32], [33], [34, 35]]


def _batch(**kw):
    return align.build_aligned_batch(MEMORIES, PROMPTS, COMPLETIONS, pad_id=PAD, bos_id=BOS, **kw)


def test_host_builder_element_by_element():
    b = _batch()
    np.testing.assert_array_equal(b.teacher.tokens, [
        [1, 10, 11, 20, 30, 31, 32],
        [1, 12, 21, 22, 33, 0, 0],
        [1, 13, 14, 15, 23, 34, 35],
    ])
    np.testing.assert_array_equal(b.student.tokens, [
        [1, 20, 30, 31, 32],
        [1, 21, 22, 33, 0],
        [1, 23, 34, 35, 0],
    ])
    np.testing.assert_array_equal(b.teacher.valid, [
        [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b.student.valid, [
        [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(b.teacher.positions[1], np.arange(7))
    np.testing.assert_array_equal(b.teacher.completion_pos, [[4, 5, 6], [4, 1, 1], [5, 6, 1]])
    np.testing.assert_array_equal(b.student.completion_pos, [[2, 3, 4], [3, 1, 1], [2, 3, 1]])
    np.testing.assert_array_equal(b.completion, [[30, 31, 32], [33, 0, 0], [34, 35, 0]])
    np.testing.assert_array_equal(b.completion_mask, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    for rows in (b.teacher, b.student):
        for r in range(3):
            for m in range(3):
                if b.completion_mask[r, m]:
                    assert rows.tokens[r, rows.completion_pos[r, m]] == b.completion[r, m]


def test_fixed_lengths_and_errors():
    b = _batch(teacher_len=10, student_len=8, completion_len=4)
    assert b.teacher.tokens.shape == (3, 10) and b.student.tokens.shape == (3, 8)
    assert b.completion.shape == (3, 4) and not b.completion_mask[:, 3].any()
    np.testing.assert_array_equal(b.teacher.tokens[0], [1, 10, 11, 20, 30, 31, 32, 0, 0, 0])
    with pytest.raises(ValueError,
                       match="teacher row 0: prefix 4 \\+ completion 3 tokens = 7 > row length 6"):
        _batch(teacher_len=6)
    with pytest.raises(ValueError, match="completion_len"):
        _batch(completion_len=2)
    with pytest.raises(ValueError, match="student row 0: the prefix is empty"):
        align.build_aligned_batch([[5]], [[]], [[7]])
    with pytest.raises(ValueError, match="one entry per row"):
        align.build_aligned_batch([[5]], [[6], [7]], [[7], [8]])


def test_gather_completion_logits_element_by_element():
    b = _batch()
    B, T, V = b.teacher.tokens.shape + (3,)
    # logits[b, t, v] encode (b, t, v) so the gathered index can be read back
    code = (100 * np.arange(B)[:, None, None] + np.arange(T)[None, :, None]
            + 0.01 * np.arange(V)[None, None, :]).astype(np.float32)
    got = np.asarray(align.gather_completion_logits(jnp.asarray(code),
                                                    jnp.asarray(b.teacher.completion_pos)))
    assert got.shape == (B, 3, V)
    for r in range(B):
        for m in range(3):
            np.testing.assert_array_equal(got[r, m], code[r, b.teacher.completion_pos[r, m] - 1])
    # row 1, m=0: completion token at index 4 is predicted by index 3 (prompt token 22)
    assert got[1, 0, 0] == 103.0
    x = jnp.asarray(b.teacher.tokens)
    np.testing.assert_array_equal(
        np.asarray(align.gather_positions(x, jnp.asarray(b.teacher.completion_pos))),
        np.where(b.completion_mask, b.completion, b.teacher.tokens[:, 1:2]))  # pad slots -> index 1


def test_device_builder_matches_host_builder():
    P, Q, M = 6, 4, 3
    tp = np.full((3, P), 9, np.int32)  # garbage beyond each prefix length must be ignored
    sp = np.full((3, Q), 9, np.int32)
    t_len, s_len = [], []
    for r, (mem, pr) in enumerate(zip(MEMORIES, PROMPTS)):
        t = [BOS] + mem + pr
        s = [BOS] + pr
        tp[r, :len(t)], sp[r, :len(s)] = t, s
        t_len.append(len(t))
        s_len.append(len(s))
    comp = np.full((3, M), 7, np.int32)
    cmask = np.zeros((3, M), bool)
    for r, c in enumerate(COMPLETIONS):
        comp[r, :len(c)], cmask[r, :len(c)] = c, True
    fn = jax.jit(align.align_sampled)
    got = fn(jnp.asarray(tp), jnp.asarray(t_len), jnp.asarray(sp), jnp.asarray(s_len),
             jnp.asarray(comp), jnp.asarray(cmask))
    want = _batch(teacher_len=P + M, student_len=Q + M, completion_len=M)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), w)
    fn(jnp.asarray(tp), jnp.asarray(t_len), jnp.asarray(sp), jnp.asarray(s_len),
       jnp.asarray(comp), jnp.asarray(~cmask | cmask))
    assert fn._cache_size() == 1


def _token_only_model(tokens):
    """A 'causal LM' whose logits depend on the current token only: aligned logits coincide."""
    table = jnp.sin(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8))
    return table[tokens]


def test_completion_divergence_zero_when_aligned_and_positive_when_misaligned():
    b = jax.tree.map(jnp.asarray, _batch(teacher_len=9, student_len=7, completion_len=4))
    t_logits = _token_only_model(b.teacher.tokens)
    s_logits = _token_only_model(b.student.tokens)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        total, count = align.completion_divergence(name, s_logits, t_logits, b)
        assert float(count) == 6.0
        assert abs(float(total)) < 1e-6
    # shifting the student's gather by one position breaks the alignment
    shifted = b._replace(student=b.student._replace(completion_pos=b.student.completion_pos + 1))
    total, _ = align.completion_divergence("forward_kl", s_logits, t_logits, shifted)
    assert float(total) > 0.1


def test_padded_rows_give_the_same_logits_as_rows_alone(tiny_model):
    """With the real decoder: a student row in a right-padded batch predicts its completion
    exactly as the same row run alone, unpadded (the valid mask and positions are right)."""
    b = _batch(student_len=8, completion_len=4)
    logits, _ = tiny_model(jnp.asarray(b.student.tokens), jnp.asarray(b.student.positions),
                           mask=jnp.asarray(b.student.valid))
    batched = np.asarray(align.gather_completion_logits(logits,
                                                        jnp.asarray(b.student.completion_pos)))
    for r in (1, 2):  # the rows with padding
        pr, c = PROMPTS[r], COMPLETIONS[r]
        row = np.asarray([BOS] + pr + c)[None]
        alone, _ = tiny_model(jnp.asarray(row), jnp.arange(row.shape[1])[None])
        alone = np.asarray(alone)[0, len(pr):len(pr) + len(c)]  # positions predicting c
        np.testing.assert_allclose(batched[r, :len(c)], alone, rtol=1e-5, atol=1e-5)
