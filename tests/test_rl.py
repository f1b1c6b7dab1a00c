"""RL core: estimators and losses against hand values / brute force, rewards, exact accumulation,
sharding, no recompilation, and learning on a toy task (GRPO, PPO, ReST-EM, shuffled control)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sleep_jax.mesh import make_mesh
from sleep_jax.rl import (
    JudgeReward,
    RLConfig,
    ValueLM,
    compute_advantages,
    get_reward,
    rest_em_batch,
    sample_rollout,
    train_rl,
    with_rewards,
)
from sleep_jax.rl import losses as L
from sleep_jax.rl.update import make_update
from sleep_jax.train.state import create_train_state, fresh_copy

# ------------------------------------------------------------------------------ estimators


def test_group_advantages_against_numpy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=12).astype(np.float32)
    mask = np.ones((12, 3), bool)
    mask[5, 2:] = False
    G = 4
    got = {n: np.asarray(compute_advantages(n, r, mask, group_size=G, eps=1e-6)[0])
           for n in ("grpo", "grpo_no_std", "rloo")}
    for g in range(3):
        rr = r[g * G:(g + 1) * G]
        for i in range(G):
            row = g * G + i
            others = [rr[j] for j in range(G) if j != i]
            want = {"grpo": (rr[i] - rr.mean()) / (np.std(rr, ddof=1) + 1e-6),
                    "grpo_no_std": rr[i] - rr.mean(),
                    "rloo": rr[i] - np.mean(others)}
            for n, w in want.items():
                np.testing.assert_allclose(got[n][row][mask[row]], w, rtol=1e-5, atol=1e-6)
                assert np.all(got[n][row][~mask[row]] == 0)


def test_gae_against_brute_force():
    rng = np.random.default_rng(1)
    B, M, gamma, lam = 3, 5, 0.9, 0.8
    values = rng.normal(size=(B, M)).astype(np.float32)
    rewards = rng.normal(size=B).astype(np.float32)
    lengths = [5, 3, 1]
    mask = np.arange(M)[None] < np.array(lengths)[:, None]
    adv, ret = compute_advantages("gae", rewards, mask, values, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        r = np.zeros(n)
        r[-1] = rewards[b]
        v = list(values[b, :n]) + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n))
            np.testing.assert_allclose(adv[b, t], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ret[b, t], want + v[t], rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(adv[b, n:]) == 0)
    # gamma = lam = 1 with zero values: every token's advantage is the sequence reward
    a1, _ = compute_advantages("gae", rewards, mask, np.zeros((B, M)), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(np.asarray(a1)[mask], np.repeat(rewards, lengths), rtol=1e-6)


def test_estimator_errors_name_the_value():
    with pytest.raises(ValueError, match="group_size=3"):
        compute_advantages("grpo", np.zeros(8), np.ones((8, 2), bool), group_size=3)
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        compute_advantages("nope", np.zeros(8), np.ones((8, 2), bool))
    with pytest.raises(ValueError, match="algorithm='sac'"):
        RLConfig(algorithm="sac")


# ------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("ratio,adv,loss,dloss", [
    (1.1, 2.0, -2.2, -2.2),   # inside the clip range: plain surrogate, gradient rho * (-A)
    (1.5, 1.0, -1.2, 0.0),    # above 1 + eps with A > 0: clipped, no gradient
    (1.5, -1.0, 1.5, 1.5),    # above with A < 0: the unclipped (pessimistic) term is active
    (0.5, 1.0, -0.5, -0.5),   # below 1 - eps with A > 0: unclipped term active
    (0.5, -1.0, 0.8, 0.0),    # below with A < 0: clipped, no gradient
])
def test_clipped_token_hand_values(ratio, adv, loss, dloss):
    old = jnp.zeros((1, 1))
    a = jnp.full((1, 1), adv)
    m = jnp.ones((1, 1), bool)
    f = lambda lp: L.clipped_token(lp, old, a, m, eps_low=0.2)[0]
    lp = jnp.full((1, 1), math.log(ratio))
    np.testing.assert_allclose(f(lp), loss, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(lp)[0, 0], dloss, rtol=1e-6, atol=1e-7)
    clipped = dloss == 0.0
    assert float(L.clip_fraction(lp, old, a, m, eps_low=0.2)[0]) == float(clipped)


def test_clipped_token_counts_and_asymmetric_clip():
    lp = jnp.log(jnp.array([[1.3, 1.3, 9.0]]))
    s, c = L.clipped_token(lp, jnp.zeros((1, 3)), jnp.ones((1, 3)),
                           jnp.array([[True, True, False]]), eps_low=0.2, eps_high=0.28)
    np.testing.assert_allclose(s, -2.56, rtol=1e-6)  # 2 tokens at min(1.3, 1.28)
    assert float(c) == 2.0


def test_clipped_sequence_hand_values():
    # row 0: token log-ratios log 1.1 and log 1.3 -> rho = sqrt(1.43); row 1: empty
    lp = jnp.log(jnp.array([[1.1, 1.3], [1.0, 1.0]]))
    m = jnp.array([[True, True], [False, False]])
    adv = jnp.array([[2.0, 2.0], [5.0, 5.0]])
    s, c = L.clipped_sequence(lp, jnp.zeros((2, 2)), adv, m, eps_low=0.2, eps_high=0.2)
    np.testing.assert_allclose(s, -2.0 * min(math.sqrt(1.43), 1.2), rtol=1e-6)
    assert float(c) == 1.0


def test_kl_estimators_hand_values_and_expectation():
    lp, ref = jnp.log(jnp.array([[0.5]])), jnp.log(jnp.array([[0.25]]))
    m = jnp.ones((1, 1), bool)
    np.testing.assert_allclose(L.kl_k1(lp, ref, m)[0], math.log(2), rtol=1e-6)
    np.testing.assert_allclose(L.kl_k3(lp, ref, m)[0], 0.5 - math.log(0.5) - 1, rtol=1e-6)
    # both are unbiased: E_{x~pi}[k(x)] = KL(pi || ref), by exact enumeration
    rng = np.random.default_rng(0)
    pi, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    kl = float(np.sum(pi * np.log(pi / q)))
    one = jnp.ones((1, 1), bool)
    for k in (L.kl_k1, L.kl_k3):
        assert float(k(jnp.zeros((1, 6)), jnp.zeros((1, 6)), jnp.ones((1, 6), bool))[1]) == 6
        expect = sum(p * float(k(jnp.full((1, 1), np.log(p)), jnp.full((1, 1), np.log(r)),
                                 one)[0]) for p, r in zip(pi, q))
        np.testing.assert_allclose(expect, kl, rtol=1e-5)


def test_value_loss_and_entropy_hand_values():
    v, old, ret = jnp.array([[1.0, 0.5]]), jnp.array([[0.0, 0.4]]), jnp.array([[0.0, 1.0]])
    m = jnp.ones((1, 2), bool)
    s, c = L.value_loss(v, old, ret, m, clip=0.2)
    # token 0: max(1^2, (0.2-0)^2) = 1; token 1: max(0.25, (0.5-1)^2=0.25) = 0.25
    np.testing.assert_allclose(s, 0.5 * (1.0 + 0.25), rtol=1e-6)
    assert float(c) == 2
    s2, _ = L.value_loss(jnp.array([[0.0]]), jnp.array([[1.0]]), jnp.array([[0.5]]),
                         jnp.ones((1, 1), bool), clip=0.2)
    np.testing.assert_allclose(s2, 0.5 * max(0.25, (0.8 - 0.5) ** 2), rtol=1e-6)
    h = L.token_entropy(jnp.log(jnp.array([[[0.5, 0.25, 0.25]]])))
    np.testing.assert_allclose(h, [[1.5 * math.log(2)]], rtol=1e-6)


# ------------------------------------------------------------------------------ rewards


def _edit_distance(a: str, b: str) -> int:  # textbook DP, the test's independent reference
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
    return d[-1]


def test_levenshtein_reward_known_strings_and_cutoff():
    pairs = [("kitten", "sitting"), ("flaw", "lawn"), ("same", "same"), ("", ""),
             ("abc", ""), ("The cat sat.", "A cat sat!")]
    got = get_reward("levenshtein", z0=1.0)([a for a, _ in pairs], [b for _, b in pairs])
    for (a, b), g in zip(pairs, got):
        n = max(len(a), len(b))
        want = 1.0 - _edit_distance(a, b) / n if n else 1.0
        np.testing.assert_allclose(g, want, rtol=1e-6)
    assert got[0] == pytest.approx(1 - 3 / 7)
    # the cut-off: d/max_len = 3/7 earns a reward at z0 = 3/7, nothing just below
    assert get_reward("levenshtein", z0=3 / 7)(["kitten"], ["sitting"])[0] == pytest.approx(4 / 7)
    assert get_reward("levenshtein", z0=3 / 7 - 1e-6)(["kitten"], ["sitting"])[0] == 0.0
    with pytest.raises(ValueError, match="z0=1.5"):
        get_reward("levenshtein", z0=1.5)(["a"], ["b"])


def test_exact_match_and_f1_rewards():
    em = get_reward("exact_match")(["The Paris.", "Lyon"], ["paris", "Paris"])
    np.testing.assert_array_equal(em, [1.0, 0.0])
    f1 = get_reward("f1")(["red big house"], ["big red car"])
    np.testing.assert_allclose(f1, [2 / 3], rtol=1e-6)


class _WordTok:
    """A whitespace tokenizer with the HF `tokenizers` encode interface (ids on the fly)."""

    def __init__(self):
        self.ids = {"<pad>": 0}

    def encode(self, text, add_special_tokens=False):
        ids = [self.ids.setdefault(w, len(self.ids)) for w in text.split()]
        return type("Enc", (), {"ids": ids})()


class _StandIn(nnx.Module):
    """A judge whose next-token logits are set by hand: +s on `yes`, -s on `no` where the
    current token is `marker`, the opposite elsewhere (so reading the wrong position flips it)."""

    def __init__(self, vocab, yes, no, marker, s):
        self.vocab, self.yes, self.no, self.marker, self.s = vocab, yes, no, marker, s

    def __call__(self, tokens, positions, cache=None, mask=None, segment_ids=None):
        sign = jnp.where(tokens == self.marker, 1.0, -1.0)[..., None]
        onehot = (jax.nn.one_hot(self.yes, self.vocab) - jax.nn.one_hot(self.no, self.vocab))
        return self.s * sign * onehot, cache


def test_judge_reward_reads_hand_set_yes_no_logprobs():
    tok = _WordTok()
    for w in ("yes", "no", "same?", "x"):
        tok.encode(w)
    V = 64
    model = _StandIn(V, tok.ids["yes"], tok.ids["no"], tok.ids["same?"], s=2.0)
    judge = JudgeReward(model, tok, template="{a} | {b} same?", bucket=8)
    comps, refs = ["a b c d e f g", "x"], ["a", "y z"]  # different lengths, padded rows
    y, n = judge.yes_no_logprobs(comps, refs)
    lse = math.log(math.exp(2) + math.exp(-2) + (V - 2))
    np.testing.assert_allclose(y, [2 - lse] * 2, rtol=1e-5)
    np.testing.assert_allclose(n, [-2 - lse] * 2, rtol=1e-5)
    np.testing.assert_array_equal(judge(comps, refs), [1.0, 1.0])
    flipped = JudgeReward(_StandIn(V, tok.ids["yes"], tok.ids["no"], tok.ids["same?"], s=-1.0),
                          tok, template="{a} | {b} same?", bucket=8)
    np.testing.assert_array_equal(flipped(comps, refs), [0.0, 0.0])
    # imitation = gamma * r_sem + (1 - gamma) * r_lev
    imit = get_reward("imitation", gamma=0.25, z0=1.0, judge=judge)(["kitten"], ["sitting"])
    np.testing.assert_allclose(imit, [0.25 + 0.75 * (4 / 7)], rtol=1e-6)
    with pytest.raises(ValueError, match="needs a judge"):
        get_reward("imitation", gamma=0.5)(["a"], ["a"])
    with pytest.raises(ValueError, match="exactly one token"):
        JudgeReward(model, tok, yes="yes please")


# ------------------------------------------------------------------------------ update


@pytest.fixture(scope="module")
def small():
    """A tiny vocab-32 model and a rollout of 4 prompts x G=4 with random rewards."""
    from sleep_jax.models import create_model, get_preset

    cfg = get_preset("tiny", vocab=32)
    model = create_model(cfg, seed=0)
    prompts = jnp.array([[1, 2, 3], [1, 4, 0], [1, 5, 6], [1, 7, 0]], jnp.int32)
    lens = jnp.array([3, 2, 3, 2], jnp.int32)
    rl = RLConfig(group_size=4, max_new_tokens=4, top_k=8)
    roll = jax.jit(lambda m, p, n, k: sample_rollout(m, None, p, n, k, cfg=rl, eos_id=31))(
        model, prompts, lens, jax.random.key(3))
    rewards = np.random.default_rng(0).normal(size=16).astype(np.float32)
    return cfg, model, with_rewards(roll, rewards, rl)


def test_rollout_logprobs_are_the_untruncated_policy(small):
    from sleep_jax.sampling import score

    _, model, roll = small
    want = score(model, roll.prompt, roll.prompt_len, roll.completion, roll.mask)
    np.testing.assert_allclose(roll.old_logp, want, rtol=1e-5, atol=1e-6)
    assert roll.completion.shape == (16, 4)
    np.testing.assert_array_equal(roll.prompt[4:8], jnp.repeat(roll.prompt[4:5], 4, 0))


def _state(model, lr=1.0):
    from sleep_jax.train.state import create_train_state, fresh_copy

    return create_train_state(fresh_copy(model), optax.sgd(lr))


def _delta(a, b):
    return jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a.params, b.params)


def _close(a, b, rtol=1e-5):
    """rtol relative to the array's scale: entries near 0 differ only by summation order."""
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def test_micro_batches_equal_full_batch_and_no_recompile(small):
    _, model, roll = small
    mesh1 = make_mesh("fsdp=1", devices=jax.devices()[:1])
    base = _state(model)
    out = {}
    for k in (1, 4):
        cfg = RLConfig(group_size=4, max_new_tokens=4, micro_batches=k, kl_coef=0.1,
                       entropy_coef=0.01)
        upd = make_update(base, mesh1, cfg, donate=False)
        out[k], m = upd(base, roll, jax.random.key(0))
        if k == 4:
            upd(out[k], roll, jax.random.key(1))
            assert upd.jitted._cache_size() == 1
    d1, d4 = _delta(out[1], base), _delta(out[4], base)
    jax.tree.map(_close, d1, d4)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(d1)) > 1e-4  # it moved
    assert np.isfinite(float(m["loss"])) and float(m["kl"]) == 0.0  # policy == reference


def test_sharded_update_equals_single_device(small):
    _, model, roll = small
    cfg = RLConfig(group_size=4, max_new_tokens=4, mini_batches=2, epochs=2)
    res = []
    for spec, devs in (("fsdp=1", jax.devices()[:1]), ("data=2,fsdp=2,tensor=2", None)):
        base = _state(model, lr=0.1)
        upd = make_update(base, make_mesh(spec, devices=devs), cfg, donate=False)
        new, _ = upd(base, roll, jax.random.key(0))
        res.append(_delta(new, base))
    # four sequential optimizer steps (2 epochs x 2 mini-batches) compound summation-order
    # differences, hence 1e-4 of the scale rather than the single-step 1e-5
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), *res)


def test_ppo_value_head_and_update(small):
    cfg_m, model, _ = small
    from sleep_jax.train.state import create_train_state, fresh_copy

    vm = ValueLM(fresh_copy(model))
    cfg = RLConfig(algorithm="ppo", group_size=4, max_new_tokens=4, gamma=1.0, lam=1.0)
    prompts = jnp.array([[1, 2], [1, 3]], jnp.int32)
    roll = sample_rollout(vm, None, prompts, jnp.array([2, 2]), jax.random.key(0), cfg=cfg,
                          eos_id=None)
    assert float(jnp.abs(roll.values).max()) == 0.0  # the head starts at V = 0
    roll = with_rewards(roll, np.arange(8, dtype=np.float32), cfg)
    np.testing.assert_allclose(roll.returns[:, 0], np.arange(8))  # gamma=lam=1, V=0
    state = create_train_state(vm, optax.adam(1e-2))
    upd = make_update(state, make_mesh("fsdp=1", devices=jax.devices()[:1]), cfg, donate=False)
    new, m = upd(state, roll, jax.random.key(0))
    assert float(m["value_loss"]) > 0
    assert float(jnp.abs(new.params["value_w"][...]).max()) > 0  # the critic trains


def test_rest_em_batch_masks_only_kept_completions(small):
    _, _, roll = small
    roll = roll.replace(rewards=jnp.array([1.0, 0.0] * 8))
    batch, kept = rest_em_batch(roll, threshold=1.0)
    assert kept == 8
    lm = np.asarray(batch["loss_mask"])
    P = roll.prompt.shape[1]
    for b in range(16):
        n, c = int(roll.prompt_len[b]), int(roll.mask[b].sum())
        want = np.zeros(lm.shape[1], bool)
        if b % 2 == 0:
            want[n - 1:n - 1 + c] = True  # input index i predicts token i + 1
        np.testing.assert_array_equal(lm[b], want)
        np.testing.assert_array_equal(np.asarray(batch["targets"])[b, n - 1:n - 1 + c],
                                      np.asarray(roll.completion)[b, :c])
    assert lm.shape[1] == P + roll.completion.shape[1] - 1


# ------------------------------------------------------------------------------ learning

STEPS = 50


def _toy_run(algorithm, shuffle=False, lr=3e-3):
    """Prompt [bos, x] (x in 2..9); reward 1 when token x + 10 appears among 3 sampled tokens
    (chance about 3/32)."""
    from sleep_jax.models import create_model, get_preset
    from sleep_jax.train.state import create_train_state

    model = create_model(get_preset("tiny", vocab=32), seed=0)
    if algorithm == "ppo":
        model = ValueLM(model)
    state = create_train_state(model, optax.adam(lr))
    cfg = RLConfig(algorithm=algorithm, group_size=8, max_new_tokens=3,
                   rest_sft_steps=2 if algorithm == "rest_em" else 1)
    xs = list(range(2, 10))
    reward = lambda comps, refs: np.array([float(r in c) for c, r in zip(comps, refs)])
    transform = (lambda r, s: np.random.default_rng(s).permutation(r)) if shuffle else None
    _, hist = train_rl(state, [[1, x] for x in xs], [x + 10 for x in xs], reward, cfg=cfg,
                       mesh=make_mesh("fsdp=1", devices=jax.devices()[:1]), steps=STEPS,
                       prompts_per_step=8, rng=jax.random.key(0), progress=False,
                       reward_transform=transform)
    r = [h["reward_mean"] for h in hist]
    return r[0], float(np.mean(r[-5:]))


@pytest.mark.parametrize("algorithm,target", [("grpo", 0.8), ("ppo", 0.8), ("rest_em", 0.6)])
def test_learns_toy_task(algorithm, target):
    first, last = _toy_run(algorithm)
    assert first <= 0.2, first
    assert last >= target, (first, last)


def test_shuffled_rewards_do_not_learn():
    first, last = _toy_run("grpo", shuffle=True)
    assert last <= 0.35, (first, last)


# ------------------------------------------------------------------------------ Dr. GRPO, guard


def test_dr_grpo_constant_normaliser_hand_value(small):
    """loss_norm="constant": the policy term is -sum_i A_i n_i / (B x M) at ratio 1 (the
    rollout's own policy), against -sum_i A_i n_i / sum_i n_i for "tokens" (n_i: row i's
    completion tokens, A_i: r_i - group mean); the gradients differ by sum n_i / (B x M);
    metrics stay per-token means."""
    from sleep_jax.rl.update import grpo_loss, loss_norms

    _, model, roll = small
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    B, M = roll.mask.shape
    # rows of 4, 3, 2, 1 tokens (scoring is causal: the kept tokens' old log-probs hold)
    keep = np.asarray(roll.mask) & (np.arange(M)[None] < np.tile([4, 3, 2, 1], 4)[:, None])
    roll = roll.replace(mask=jnp.asarray(keep), old_logp=jnp.where(keep, roll.old_logp, 0.0),
                        ref_logp=jnp.where(keep, roll.ref_logp, 0.0))
    lens = keep.sum(1)
    r = np.asarray(roll.rewards).reshape(4, 4)
    a = (r - r.mean(1, keepdims=True)).reshape(-1)
    assert lens.min() < M and lens.max() == M  # the two normalisers differ
    res = {}
    for norm in ("tokens", "constant"):
        cfg = RLConfig(group_size=4, max_new_tokens=4, advantage="grpo_no_std", loss_norm=norm)
        rl = with_rewards(roll, roll.rewards, cfg)
        norms = loss_norms(rl, cfg)
        assert float(norms["count"]) == lens.sum()
        (loss, _), g = jax.value_and_grad(grpo_loss, has_aux=True)(
            params, rl, graphdef=graphdef, other=other, cfg=cfg, norms=norms)
        res[norm] = (float(loss), g)
    np.testing.assert_allclose(res["constant"][0], -np.sum(a * lens) / (B * M), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(res["tokens"][0], -np.sum(a * lens) / lens.sum(), rtol=1e-4,
                               atol=1e-6)
    scale = lens.sum() / (B * M)
    jax.tree.map(lambda x, y: _close(np.asarray(x), scale * np.asarray(y)),
                 res["constant"][1], res["tokens"][1])
    with pytest.raises(ValueError, match="clipped_sequence"):
        RLConfig(loss_norm="constant", policy_loss="clipped_sequence")
    with pytest.raises(ValueError, match="loss_norm='mean'"):
        RLConfig(loss_norm="mean")


def test_rl_update_skips_a_nonfinite_step_bitwise(small):
    """A NaN advantage row makes the loss NaN: params and optimizer state stay bitwise, the
    step is reported skipped; the same rollout with finite rewards moves the params."""
    _, model, roll = small
    cfg = RLConfig(group_size=4, max_new_tokens=4)
    state = create_train_state(fresh_copy(model), optax.adam(1e-2))
    before = jax.device_get((state.params, state.opt_state))
    upd = make_update(state, make_mesh("fsdp=1", devices=jax.devices()[:1]), cfg, donate=False)
    bad = with_rewards(roll, np.where(np.arange(16) == 0, np.nan, np.asarray(roll.rewards)), cfg)
    new, m = upd(state, bad, jax.random.key(0))
    assert int(m["skipped"]) == 1
    for x, y in zip(jax.tree.leaves(jax.device_get((new.params, new.opt_state))),
                    jax.tree.leaves(before)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    new, m = upd(state, roll, jax.random.key(0))
    assert int(m["skipped"]) == 0
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
        jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(before[0])))


# ------------------------------------------------------------------------------ imitation


def _lev(a: str, b: str) -> int:
    """Levenshtein distance by the textbook dynamic programme (reference for rapidfuzz)."""
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
    return d[len(b)]


def test_imitation_student_continuation_matches_the_teacher_remainder_length(small):
    """The student writes as many tokens as the teacher's remainder y[c:] it is compared
    with (eos off: exactly |y| - c), its log-probs are the policy's on that continuation,
    and score_imitation's rewards are 1 - d/max_len (<= z0) from a plain DP distance."""
    from sleep_jax.distill.imitation import imitation_rollout, score_imitation
    from sleep_jax.models import create_model
    from sleep_jax.sampling import generate, score

    cfg_m, teacher, _ = small
    student = create_model(cfg_m, seed=1)
    tp = jnp.array([[1, 5, 6, 2], [1, 7, 3, 0], [1, 9, 0, 0]], jnp.int32)
    tl = jnp.array([4, 3, 2], jnp.int32)
    sp = jnp.array([[1, 2], [1, 3], [1, 0]], jnp.int32)
    sl = jnp.array([2, 2, 1], jnp.int32)
    Y, G = 8, 2
    rl = RLConfig(group_size=G, max_new_tokens=3)  # 3 is ignored: lengths follow y[c:]
    key = jax.random.key(5)
    roll, target, tmask = jax.jit(lambda s, t, k: imitation_rollout(
        s, t, tp, tl, sp, sl, k, rl_cfg=rl, text_tokens=Y, eos_id=None))(student, teacher, key)
    y = generate(teacher, tp, tl, jax.random.split(key, 3)[0], max_new_tokens=Y, eos_id=None)
    assert roll.completion.shape == (3 * G, Y)
    cuts = []
    for row in range(3 * G):
        cut = int(roll.prompt_len[row]) - int(sl[row // G])
        cuts.append(cut)
        remainder = np.asarray(y.tokens[row // G])[cut:]
        np.testing.assert_array_equal(np.asarray(target[row])[np.asarray(tmask[row])],
                                      remainder)
        assert int(roll.mask[row].sum()) == len(remainder) == Y - cut
        assert not np.asarray(roll.mask[row, Y - cut:]).any()
    assert len(set(cuts)) > 1  # different cuts: different lengths, each matched
    want = score(student, roll.prompt, roll.prompt_len, roll.completion, roll.mask)
    np.testing.assert_allclose(roll.old_logp, want, rtol=1e-5, atol=1e-6)

    decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)
    scored, rewards = score_imitation(roll, target, tmask, decode=decode,
                                      reward_fn=get_reward("imitation", gamma=0.0, z0=0.5),
                                      rl_cfg=rl)
    for row in range(3 * G):
        c = decode(np.asarray(roll.completion[row])[np.asarray(roll.mask[row])].tolist())
        t = decode(np.asarray(target[row])[np.asarray(tmask[row])].tolist())
        assert len(c) == len(t)
        z = _lev(c, t) / len(t)
        np.testing.assert_allclose(rewards[row], 1 - z if z <= 0.5 else 0.0, rtol=1e-6)


def test_imitation_rewards_and_advantages_hand_values():
    """Hand rollout, letters as tokens: 'abc' vs 'abd' d=1 -> 2/3; 'ab' vs 'ab' -> 1;
    'abcd' vs 'wxyz' d=4 -> 0 (z=1 > z0); 'ab' vs 'ac' d=1, z=1/2=z0 -> 1/2. Groups of 2:
    GRPO advantages -+1/sqrt(2) in each group."""
    from sleep_jax.distill.imitation import score_imitation
    from sleep_jax.rl.rollout import Rollout

    L = lambda s: [ord(ch) - ord("a") for ch in s]
    comps, tgts = ["abc", "ab", "abcd", "ab"], ["abd", "ab", "wxyz", "ac"]

    def pad(rows, M=4):
        t = np.zeros((len(rows), M), np.int32)
        m = np.zeros((len(rows), M), bool)
        for i, r in enumerate(rows):
            t[i, :len(r)], m[i, :len(r)] = L(r), True
        return jnp.asarray(t), jnp.asarray(m)

    ct, cm = pad(comps)
    tt, tm = pad(tgts)
    z = jnp.zeros((4, 4), jnp.float32)
    roll = Rollout(prompt=jnp.ones((4, 1), jnp.int32), prompt_len=jnp.ones(4, jnp.int32),
                   completion=ct, mask=cm, old_logp=z, ref_logp=z, values=z,
                   rewards=jnp.zeros(4), advantages=z, returns=z)
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)
    rl = RLConfig(group_size=2, max_new_tokens=4)
    scored, r = score_imitation(roll, tt, tm, decode=decode,
                                reward_fn=get_reward("imitation", gamma=0.0, z0=0.5), rl_cfg=rl)
    np.testing.assert_allclose(r, [2 / 3, 1.0, 0.0, 0.5], rtol=1e-6)
    s = 1 / math.sqrt(2)
    adv = np.asarray(scored.advantages)
    for row, want in enumerate([-s, s, -s, s]):
        np.testing.assert_allclose(adv[row][np.asarray(cm[row])], want, rtol=1e-4)


# ------------------------------------------------------------------------------ benchmark


def test_benchmark_rl_runs_on_its_default_mesh(capsys):
    """benchmarks/rl.py's own code path with its default preset and mesh (tiny, fsdp=-1: all
    8 fake devices, rows split 8 ways) at smaller sizes: 2 prompts x 4 (8 rows, one per
    device) of 4 + 4 tokens, one timed repeat (the defaults, 64 rows of 32 + 32 tokens and 5
    repeats, take ~100 s here). It failed before the steps put their inputs onto the mesh:
    the SFT batch's loss mask arrived replicated. eos off: 8 x 4 tokens are generated."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_rl", os.path.join(root,
                                                                           "benchmarks/rl.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    defaults = bench.parse_args([])
    assert (defaults.preset, defaults.mesh) == ("tiny", "fsdp=-1")
    rec = bench.run(["--prompts", "2", "--group", "4", "--prompt-len", "4", "--new-tokens", "4",
                     "--repeats", "1"])
    assert rec["devices"] == 8 and rec["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert rec["rows"] == 8 and rec["generated_tokens"] == 2 * 4 * 4
    for k in ("sft_step_s", "grpo_update_s", "rollout_s"):
        assert 0 < rec[k] < 60, (k, rec[k])
    assert '"benchmark": "rl"' in capsys.readouterr().out
