"""Dreaming (sleep_jax/dream/): the vmapped inner loop equals a loop of the same per-dream
function, selection equals brute force, the contrastive reward ranks a dream stating the
answers above an unrelated dream and the null dream, one dream iteration runs as one jit.

One tiny model and one set of shapes (2 dreams + C of 20 tokens, tau of 3 questions x 4
candidates) throughout, so the tests share compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.dream import inner, iteration, reward, select
from sleep_jax.dream.config import DreamConfig
from sleep_jax.dream.tau import Tau, candidate_logprobs
from sleep_jax.grow import activate_slot, grow_model
from sleep_jax.mesh import make_mesh
from sleep_jax.models import create_model, get_preset
from sleep_jax.rl import RLConfig
from sleep_jax.train.adapters import create_adapter_state
from sleep_jax.train.optim import OptimConfig, make_optimizer

V, GEN, INNER, T, Q, K = 64, 0, 1, 20, 3, 4
CFG = DreamConfig(dreams=3, keep_top=1, keep_random=1, steps=4, lr=5e-2, clip_norm=1.0,
                  max_dream_tokens=8)


def _small(**kw):
    return get_preset("tiny", vocab=V, embed=32, mlp=64, layers=2, heads=4, kv_heads=2,
                      head_dim=8, **kw)


@pytest.fixture(scope="module")
def slotted():
    """The tiny preset (shrunk) grown to 2 expert slots, both activated (A random, B = 0):
    slot GEN for the generator adapter, slot INNER for the per-dream adapters."""
    cfg = _small()
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    grown, _ = grow_model(create_model(cfg, seed=0), cfg,
                          cfg.replace(expert_slots=2, expert_rank=4), mesh=mesh,
                          rng=jax.random.key(1))
    grown, _ = activate_slot(grown, None, GEN, jax.random.key(2))
    grown, _ = activate_slot(grown, None, INNER, jax.random.key(3))
    return grown


def _row(x):
    t = np.zeros(T, np.int32)
    t[:len(x)] = x
    return t, np.arange(T) < len(x)


@pytest.fixture(scope="module")
def case():
    """tau: 3 random 5-token prompts, 4 one-token candidates each. Dreams: one stating each
    prompt followed by its correct answer, one unrelated (random tokens); C: a passage holding
    the correct answers among other tokens, without the prompts."""
    rng = np.random.default_rng(5)
    prompts = rng.integers(4, V, (Q, 5))
    ans = rng.integers(4, V, (Q, K))
    correct = np.array([0, 1, 2])
    tau = Tau(jnp.asarray(prompts, jnp.int32), jnp.full((Q,), 5, jnp.int32),
              jnp.asarray(ans[..., None], jnp.int32), jnp.ones((Q, K, 1), bool),
              jnp.asarray(correct, jnp.int32))
    stating = np.concatenate([np.r_[prompts[q], ans[q, correct[q]]] for q in range(Q)])
    unrelated = rng.integers(4, V, 15)
    ctx = np.r_[rng.integers(4, V, 5), ans[0, 0], rng.integers(4, V, 3), ans[1, 1],
                rng.integers(4, V, 3), ans[2, 2], rng.integers(4, V, 4)]
    (t0, m0), (t1, m1), (c, cm) = _row(stating), _row(unrelated), _row(ctx)
    return {"tau": tau, "tokens": jnp.asarray(np.stack([t0, t1])),
            "mask": jnp.asarray(np.stack([m0, m1])), "ctx": jnp.asarray(c),
            "ctx_mask": jnp.asarray(cm)}


@pytest.fixture(scope="module")
def rewards_fn():
    return jax.jit(lambda *a: reward.dream_rewards(*a, cfg=CFG))


@pytest.fixture(scope="module")
def rewarded(slotted, case, rewards_fn):
    base, a0 = inner.make_base(slotted, INNER)
    out = rewards_fn(base, a0, case["tokens"], case["mask"], case["ctx"], case["ctx_mask"],
                     case["tau"])
    return base, a0, out


def test_vmapped_inner_loop_equals_a_loop_of_the_per_dream_function(case, rewarded):
    base, a0, out = rewarded
    rows = jnp.concatenate([case["tokens"], case["ctx"][None]])  # the dreams, then the null
    masks = jnp.concatenate([case["mask"], case["ctx_mask"][None]])

    @jax.jit
    def one(b, a, t, m, tu):  # the per-dream function, compiled once, called in a loop
        a, losses = inner.finetune_one(b, a, t, m, cfg=CFG)
        return a, losses, candidate_logprobs(inner.adapted_model(b, a), tu)

    for i in range(3):
        a_i, l_i, lp_i = one(base, a0, rows[i], masks[i], case["tau"])
        losses = out["losses"][i] if i < 2 else out["null_losses"]
        np.testing.assert_allclose(np.asarray(losses), np.asarray(l_i), rtol=1e-5, atol=1e-5)
        for name, v in a_i.items():
            np.testing.assert_allclose(np.asarray(out["adapters"][name][...][i]),
                                       np.asarray(v[...]), rtol=1e-5, atol=1e-5, err_msg=name)
            assert not np.allclose(np.asarray(v[...]), np.asarray(a0[name][...])), name
        np.testing.assert_allclose(np.asarray(out["logprobs"][i]), np.asarray(lp_i),
                                   rtol=1e-5, atol=1e-5)
        assert float(l_i[-1]) < float(l_i[0]) - 0.1  # the steps trained it on its dream
    b = np.asarray(out["adapters"]["blocks.expert_b"][...])  # isolated: all differ
    assert not np.allclose(b[0], b[1]) and not np.allclose(b[1], b[2])


def test_a_dream_stating_the_answers_beats_an_unrelated_dream_and_the_null_dream(rewarded):
    _, _, out = rewarded
    r = np.asarray(out["rewards"])  # relative to the null dream (C itself): null = 0
    # measured (CPU, 2026-12-01): r = [0.305, 0.046]
    assert r[0] > 0.15, r  # stating the answers beats copying the passage
    assert r[0] > r[1] + 0.15, r  # and beats an unrelated dream
    assert abs(r[1]) < 0.15, r  # an unrelated dream gains little over the null dream
    # by hand from the scored log-probs: r_m = mean_q (c_q(m) - c_q(null))
    lp = np.asarray(out["logprobs"], np.float64)
    c = lp[:, np.arange(Q), [0, 1, 2]] - np.log(np.exp(lp).sum(-1))
    np.testing.assert_allclose(r, (c[:2] - c[2]).mean(-1), rtol=1e-5, atol=1e-6)
    # binary (SEAL) on the host: 1 where EM after beats EM before
    np.testing.assert_array_equal(reward.seal_binary([0.5, 0.25], 0.25), [1.0, 0.0])


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_importance_equals_brute_force_gradients(slotted, case):
    base, a0 = inner.make_base(slotted, INNER)
    rows = jnp.concatenate([case["tokens"], case["ctx"][None]])  # the last dream copies C
    masks = jnp.concatenate([case["mask"], case["ctx_mask"][None]])
    out = jax.jit(select.gradient_scores)(base, a0, rows, masks, case["ctx"], case["ctx_mask"])
    cos, norm = np.asarray(out["cosine"]), np.asarray(out["grad_norm"])
    g1 = jax.jit(jax.grad(lambda a, t, m: inner.sft_loss(base, a, t, m)))
    gc = _flat(g1(a0, case["ctx"], case["ctx_mask"]))
    for i in range(3):
        g = _flat(g1(a0, rows[i], masks[i]))
        assert np.linalg.norm(g) > 0
        np.testing.assert_allclose(cos[i], g @ gc / (np.linalg.norm(g) * np.linalg.norm(gc)),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(norm[i], np.linalg.norm(g), rtol=1e-4)
    assert cos[2] == pytest.approx(1.0, abs=1e-5)  # C's own gradient
    assert abs(cos[0]) < 0.99


def test_keep_top_k_plus_random_by_hand():
    scores = jnp.asarray([0.1, 0.9, 0.5, 0.3, 0.7])
    seen = set()
    for s in range(40):
        idx = np.asarray(select.keep_indices(scores, jax.random.key(s), top=2, random=2))
        assert idx[:2].tolist() == [1, 4]  # the two best, best first
        assert set(idx[2:].tolist()) <= {0, 2, 3} and len(set(idx.tolist())) == 4
        seen |= set(idx[2:].tolist())
    assert seen == {0, 2, 3}  # every other dream can be drawn
    assert np.asarray(select.keep_indices(scores, jax.random.key(0), top=3, random=0)
                      ).tolist() == [1, 4, 2]
    with pytest.raises(ValueError, match="at most 5"):
        select.keep_indices(scores, jax.random.key(0), top=4, random=2)


def test_verbatim_copy_of_the_context():
    ctx, cm = _row(np.array([5, 6, 7, 8, 9]))
    cases = {(6, 7, 8): True, (5, 6, 7, 8, 9): True, (9,): True, (7, 6): False,
             (8, 9, 10): False, (9, 0): False, (): False}
    for d, want in cases.items():
        t, m = _row(np.array(d, np.int32))
        got = bool(select.copies_context(jnp.asarray(t), jnp.asarray(m), jnp.asarray(ctx),
                                         jnp.asarray(cm)))
        assert got == want, d
    assert select.copies_context_text(" ka  lo mi ", "x ka lo mi lives in oslo.")
    assert not select.copies_context_text("ka lo lives", "ka lo mi lives")
    assert not select.copies_context_text("  ", "ka")


def test_bad_input_is_refused(slotted):
    with pytest.raises(ValueError, match="slot 1 is off"):
        inner.make_base(create_model(_small(expert_slots=2, expert_rank=4), seed=0), 1)
    with pytest.raises(ValueError, match="out of range"):
        inner.make_base(slotted, 5)
    with pytest.raises(ValueError, match="at most dreams"):
        DreamConfig(dreams=2, keep_top=2, keep_random=1)
    with pytest.raises(ValueError, match="score="):
        DreamConfig(score="mean")
    with pytest.raises(ValueError, match="score="):
        select.importance(None, None, None, None, None, None, score="mean")
    tx = make_optimizer(OptimConfig(), 10)
    with pytest.raises(ValueError, match="must be two different slots"):
        iteration.prepare(slotted, gen_slot=GEN, inner_slot=GEN, tx=tx)
    gen = create_adapter_state(slotted, GEN, tx)  # a generator slot whose B is not zero
    frozen = jax.tree.map(lambda x: x + 1.0, gen.frozen)
    with pytest.raises(ValueError, match="must have B = 0"):
        iteration.check_generator(gen.replace(frozen=frozen), INNER)


def _contains(dream, ctx):
    n = len(dream)
    return n > 0 and any(list(ctx[s:s + n]) == list(dream) for s in range(len(ctx) - n + 1))


@pytest.mark.slow  # one program of ~4 gradients and 4 forward passes: ~60 s of CPU to compile
@pytest.mark.parametrize("algorithm", ["grpo", "rest_em"])
def test_one_dream_iteration_is_one_jitted_pure_function(slotted, case, rewards_fn, algorithm):
    """Generate 3 dreams for each of 2 contexts, select, fine-tune, reward, update the
    generator adapter (GRPO or ReST-EM): one jit. Checked against the parts: the kept indices
    against the scores, two dreams' rewards against ``reward.dream_rewards`` run on them alone,
    the metrics by hand, the base untouched and the generator adapter moved (ReST-EM: exactly
    when a dream beat the null dream)."""
    bos = 1
    gen, a0 = iteration.prepare(slotted, gen_slot=GEN, inner_slot=INNER,
                                tx=make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10))
    base = inner.make_base(slotted, INNER)[0]
    ctx = np.r_[bos, np.asarray(case["ctx"])[:T - 1]]
    cmask = np.r_[True, np.asarray(case["ctx_mask"])[:T - 1]]
    rng = np.random.default_rng(3)
    batch = iteration.DreamBatch(
        prompt=jnp.asarray(np.c_[np.full(2, bos), rng.integers(4, V, (2, 4))], jnp.int32),
        prompt_len=jnp.asarray([5, 3], jnp.int32), ctx=jnp.asarray(np.stack([ctx, ctx])),
        ctx_mask=jnp.asarray(np.stack([cmask, cmask])),
        tau=jax.tree.map(lambda x: jnp.stack([x, x]), case["tau"]))
    rl = RLConfig(algorithm=algorithm, group_size=3, max_new_tokens=8, rest_threshold=0.0)
    step = jax.jit(lambda g, b, r: iteration.dream_iteration(
        g, INNER, a0, b, r, cfg=CFG, rl=rl, bos_id=bos, eos_id=2))
    new, out = step(gen, batch, jax.random.key(7))
    scores, keep, r = (np.asarray(out[k]) for k in ("scores", "keep", "rewards"))
    assert r.shape == (2, 3) and keep.shape == (2, 2) and np.all(np.isfinite(r))
    assert np.all(keep[:, 0] == np.argmax(scores, 1)) and np.all(keep[:, 1] != keep[:, 0])
    # two dreams of context 0, framed and padded to the reward test's shapes: same rewards
    toks, mask = np.asarray(out["all_tokens"][0]), np.asarray(out["all_mask"][0])
    ft = np.zeros((2, T), np.int32)
    fm = np.zeros((2, T), bool)
    ft[:, 0], fm[:, 0] = bos, True
    ft[:, 1:9], fm[:, 1:9] = toks[:2], mask[:2]
    ref = rewards_fn(base, a0, jnp.asarray(ft), jnp.asarray(fm), jnp.asarray(ctx),
                     jnp.asarray(cmask), case["tau"])
    np.testing.assert_allclose(r[0, :2], np.asarray(ref["rewards"]), rtol=1e-4, atol=1e-5)
    # metrics by hand
    assert float(out["zero_var_share"]) == np.mean(r.max(1) == r.min(1))
    assert float(out["reward_mean"]) == pytest.approx(r.mean(), abs=1e-6)
    kt, km = np.asarray(out["tokens"]), np.asarray(out["mask"])
    copies = [_contains(kt[c, j][km[c, j]], ctx[1:][cmask[1:]]) for c in range(2)
              for j in range(2)]
    assert float(out["copy_share"]) == pytest.approx(np.mean(copies))
    # the base never changes; the generator adapter does
    for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(gen.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(gen.params))]
    assert int(out["update/skipped"]) == 0
    if algorithm == "grpo":
        assert any(moved) and int(new.step) == 1
    else:  # ReST-EM: SFT on the dreams whose reward >= 0 (those beating the null dream)
        assert int(out["update/kept"]) == int((r >= 0).sum())
        assert any(moved) == bool((r >= 0).any())
    with pytest.raises(ValueError, match="must be two different slots"):
        iteration.check_generator(gen, GEN)
    if algorithm == "grpo":  # the sleep pipeline's entry: the same dreams, kept the same way
        kept = jax.jit(lambda g, b, r: iteration.dream_contexts(
            g, INNER, a0, b, r, cfg=CFG, rl=rl, bos_id=bos, eos_id=2))(
            gen, batch.replace(tau=None), jax.random.split(jax.random.key(7))[0])
        np.testing.assert_array_equal(np.asarray(kept["tokens"]), kt)
        np.testing.assert_array_equal(np.asarray(kept["mask"]), km)
        assert float(kept["copy_share"]) == pytest.approx(np.mean(copies))


def test_tau_of_the_world_uses_task_entities_and_the_task_wording_only():
    """Data discipline: tau's prompts are the task wording's closed-book questions about a TASK
    entity; no evaluation or validation wording; OLD/NEW entities are refused."""
    from sleep_jax.data import world as W
    from sleep_jax.dream.tau import world_tau

    world = W.make_world(seed=0, n_old=4, n_new=4, n_task=6)
    seen = []
    vocab = {}

    def encode(text):
        seen.append(text)
        return [vocab.setdefault(w, 4 + len(vocab)) for w in text.split()]

    e = world.entities("task")[0]
    tau = world_tau(world, e, encode, bos_id=1)
    prompts = seen[:len(W.ATTRIBUTES)]
    assert prompts == [W.closed_book_prompt(W.question(e, a, W.TASK_WORDING))
                       for a in W.ATTRIBUTES]
    held_out = {W.closed_book_prompt(W.question(x, a, w, k)) for x in world.entities("task")
                for a in W.ATTRIBUTES for w in W.EVALUATION + W.VALIDATION
                for k in range(len(W.QUESTION_TEMPLATES[a][w]))}
    assert not held_out & set(prompts)
    assert np.all(np.asarray(tau.prompt[:, 0]) == 1) and np.all(np.asarray(tau.correct) == 0)
    for q, a in enumerate(W.ATTRIBUTES):  # the candidates: the TASK entities' values
        values = {x.attributes[a] for x in world.entities("task")}
        k = int(np.asarray(tau.answer_mask[q]).any(-1).sum())
        assert k == len(values)
    with pytest.raises(ValueError, match="TASK entities only"):
        world_tau(world, world.entities("new")[0], encode)
