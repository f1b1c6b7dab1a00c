"""Knowledge Seeding: on-policy context distillation from the small self into the grown self.

Teacher = the model before growth (frozen), which sees ``memory + prompt``; student = the grown
model, which sees only ``prompt`` (Stage 1 of arXiv 2606.03979). Each step:

1. COLLECT. The first ``round(lam * B)`` rows' completions are sampled from the student (given
   its prompt), the rest from the teacher (given memory + prompt): GKD's lambda-mix of on-policy
   and teacher data (Agarwal et al. 2024), with no gradient through sampling.
2. ALIGN. Teacher rows ``memory + prompt + completion`` and student rows ``prompt + completion``
   are built on device and the logits predicting each completion token are gathered per row.
3. UPDATE. loss = alpha * D(teacher || student) over completion tokens (forward KL, reverse KL
   or generalized JSD(beta)) + (1 - alpha) * the Learning-to-Imitate RL loss when it is used
   (``imitation.py``); only entries of the trainable mask change.

Replay rows are the same computation with an empty memory: prompts about what the model
already knows, answered by the pre-sleep model itself (self-distillation, no labels), which is
what keeps old knowledge in place (docs/LOG.md: without replay the expert forgets OLD).

The whole step (sampling included) is one jitted pure function of (state, batch, rng).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.data.tokenizers import pad_rows
from sleep_jax.distill import align, divergences
from sleep_jax.distill.divergences import DIVERGENCES
from sleep_jax.models.protocol import EXPERTS, capabilities, forward
from sleep_jax.sampling import generate
from sleep_jax.train.finite import skip_if_nonfinite
from sleep_jax.train.state import TrainState, apply_gradients

TEACHERS = ("frozen", "self")


@dataclasses.dataclass(frozen=True)
class SeedingConfig:
    """What the paper leaves open, with our defaults (reasons in the README).

    divergence/beta: generalized JSD(0.5) (GKD's best setting, bounded, mode-covering and
      mode-seeking halves); lam: fraction of student-sampled (on-policy) completions;
    alpha: weight of GKD against the imitation RL loss; temperature: of the divergence;
    sample_temperature: of sampling completions; max_new_tokens: completion length M.
    Learning to Imitate (used when alpha < 1): gamma weighs the judge's r_sem against r_lev,
    z0 is r_lev's cut-off, imitation_group G student completions per teacher text,
    imitation_text_tokens the teacher text's length, imitation_advantage the estimator.
    gate_l1: weight of the mean expert gate over the student's tokens (with a router,
      ``ModelConfig.expert_router``). Beware: gate * B is scale-free, so the expert can
      shrink the gate and grow B (docs/LOG.md 2026-11-29).
    expert_l1: weight of the mean RMS of the expert slots' added output per token: a
      scale-free cost, so a slot stays silent where it does not lower the divergence.
    Gate and output RMS are reported per row kind (memory / replay) whenever the student has
    slots.
    teacher: "frozen" (the pre-sleep model passed to the step: Knowledge Seeding) or "self"
      (the student's own current weights, gradient stopped: on-policy self-distillation, OPSD,
      Zhao et al. 2026, arXiv 2601.18734; the passed teacher is then ignored).
    teacher_samples: 0 samples completions every step; S >= 1 writes S teacher completions
      per row and their teacher logits once before training (``distill.cache``: needs lam=0,
      teacher "frozen", alpha 1), so that a step is one student forward and backward.
    """

    divergence: str = "jsd"
    beta: float = 0.5
    lam: float = 0.5
    alpha: float = 1.0
    temperature: float = 1.0
    sample_temperature: float = 1.0
    max_new_tokens: int = 4
    gamma: float = 0.0
    z0: float = 0.5
    imitation_group: int = 4
    imitation_text_tokens: int = 8
    imitation_advantage: str = "grpo"
    gate_l1: float = 0.0
    expert_l1: float = 0.0
    teacher: str = "frozen"
    teacher_samples: int = 0

    def rl_config(self):
        """The RLConfig of the imitation part (GRPO-style update inside the seeding step)."""
        from sleep_jax.rl.config import RLConfig

        return RLConfig(algorithm="grpo", group_size=self.imitation_group,
                        max_new_tokens=self.max_new_tokens,
                        temperature=self.sample_temperature,
                        advantage=self.imitation_advantage)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r}; allowed: {sorted(DIVERGENCES)}")
        for name in ("lam", "alpha", "beta", "gamma", "z0"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"SeedingConfig.{name}={v} must be in [0, 1]")
        for name in ("gate_l1", "expert_l1"):
            if getattr(self, name) < 0:
                raise ValueError(f"SeedingConfig.{name}={getattr(self, name)} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.teacher_samples < 0:
            raise ValueError(f"SeedingConfig.teacher_samples={self.teacher_samples} must be "
                             ">= 0 (0: sample every step)")
        if self.teacher_samples and (self.lam or self.teacher != "frozen" or self.alpha < 1):
            raise ValueError(f"SeedingConfig.teacher_samples={self.teacher_samples} caches "
                             f"the frozen teacher's completions: it needs lam=0, "
                             f"teacher='frozen' and alpha=1 (got lam={self.lam}, "
                             f"teacher={self.teacher!r}, alpha={self.alpha})")
        if self.teacher not in TEACHERS:
            raise ValueError(f"SeedingConfig.teacher={self.teacher!r}; allowed: {TEACHERS}")


class SeedingBatch(NamedTuple):
    """Right-padded prefixes (host-built, fixed shapes).

    teacher_prefix [B,P] / teacher_len [B]: [bos] + memory + prompt (memory empty for replay).
    student_prefix [B,Q] / student_len [B]: [bos] + prompt.
    """

    teacher_prefix: jax.Array
    teacher_len: jax.Array
    student_prefix: jax.Array
    student_len: jax.Array


def make_batch(memories, prompts, *, bos_id: int | None, teacher_len: int,
               student_len: int, pad_id: int = 0, student_head=()) -> SeedingBatch:
    """Build a SeedingBatch from token-id lists: teacher prefixes [B, teacher_len] = bos +
    memory + prompt, student prefixes [B, student_len] = bos + student_head + prompt,
    right-padded (`data.tokenizers.pad_rows`; a row too long is named). A replay row's memory
    is ``student_head`` itself (empty without a chat template), so its two prefixes are equal.
    ``bos_id`` None: no BOS (a model whose tokenizer adds none, e.g. SmolLM2); ``student_head``:
    the chat template's tokens before the user's text (``sleep_rows.chat_parts``)."""
    head = [] if bos_id is None else [bos_id]
    teacher = [[*head, *m, *p] for m, p in zip(memories, prompts)]
    student = [[*head, *student_head, *p] for p in prompts]
    tp, tl = pad_rows(teacher, pad_id=pad_id, width=teacher_len,
                      where="seeding row (teacher prefix: bos + memory + prompt)")
    sp, sl = pad_rows(student, pad_id=pad_id, width=student_len,
                      where="seeding row (student prefix: bos + prompt)")
    return SeedingBatch(tp, tl, sp, sl)


def _logits(model, rows: align.Rows):
    return model(rows.tokens, rows.positions, mask=rows.valid)[0]


def collect(student, teacher, batch: SeedingBatch, rng, cfg: SeedingConfig, *,
            eos_id: int | None, pad_id: int = 0) -> align.AlignedBatch:
    """COLLECT + ALIGN: sample completions (lambda-mix) and build aligned teacher/student rows."""
    B = batch.student_prefix.shape[0]
    n_student = int(round(cfg.lam * B))
    r1, r2 = jax.random.split(rng)
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
              eos_id=eos_id, pad_id=pad_id)
    parts_tok, parts_mask = [], []
    if n_student:
        s_out = generate(student, batch.student_prefix[:n_student],
                         batch.student_len[:n_student], r1, **kw)
        parts_tok.append(s_out.tokens)
        parts_mask.append(s_out.mask)
    if n_student < B:
        t_out = generate(teacher, batch.teacher_prefix[n_student:],
                         batch.teacher_len[n_student:], r2, **kw)
        parts_tok.append(t_out.tokens)
        parts_mask.append(t_out.mask)
    completion = jax.lax.stop_gradient(jnp.concatenate(parts_tok, 0))
    cmask = jnp.concatenate(parts_mask, 0)
    return align.align_sampled(batch.teacher_prefix, batch.teacher_len, batch.student_prefix,
                               batch.student_len, completion, cmask, pad_id=pad_id)


def gkd_loss(student, teacher_logits_btv, aligned: align.AlignedBatch, cfg: SeedingConfig):
    """Divergence D(teacher || student) over the completion tokens as (sum, count)."""
    student_logits = _logits(student, aligned.student)
    return align.completion_divergence(cfg.divergence, student_logits, teacher_logits_btv,
                                       aligned, beta=cfg.beta, temperature=cfg.temperature)


def _has_slots(model) -> bool:
    """The model reports expert-slot activity (the protocol's "experts" capability)."""
    return EXPERTS in capabilities(model)


def divergence_and_experts(student, teacher_bmv, rows: align.Rows, completion_mask, cfg):
    """D(teacher || student) over the completion tokens of student ``rows`` against the
    teacher's logits already gathered per completion token ([B,M,V]), plus the expert slots'
    activity per row from the same forward pass when the student has slots:
    (sum, count, gate [B] or None, out_rms [B] or None), each the mean over layers (and slots)
    and the row's real tokens (a model with the "experts" capability)."""
    slots = _has_slots(student)
    out = forward(student, rows.tokens, rows.positions, mask=rows.valid, experts=slots)
    s_bmv = align.gather_completion_logits(out.logits, rows.completion_pos)
    s, c = divergences.divergence(cfg.divergence, s_bmv, teacher_bmv, completion_mask,
                                  beta=cfg.beta, temperature=cfg.temperature)
    if not slots:
        return s, c, None, None
    ex = out.experts
    v = rows.valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v, 1), 1.0)
    gate = jnp.sum(jnp.mean(ex["gate"], axis=(0, 3)) * v, 1) / n
    out_rms = jnp.sum(jnp.mean(ex["out_rms"], axis=0) * v, 1) / n
    return s, c, gate, out_rms


def seeding_step(state: TrainState, teacher: nnx.Module, batch: SeedingBatch, rng, mask=None,
                 imitation=None, *, cfg: SeedingConfig, eos_id: int | None, pad_id: int = 0):
    """One Knowledge Seeding step. Jit it with ``cfg``/``eos_id``/``pad_id`` static.

    loss = alpha * mean divergence over completion tokens
           + (1 - alpha) * the clipped-surrogate imitation loss on ``imitation``
    (an ``rl.Rollout`` with advantages from ``imitation.py``; None: GKD only).

    Args:
      state: the student's TrainState (grown model), or an AdapterState
        (``sleep_jax.train.adapters``: only the active expert slot trains, as its own tree).
      teacher: the frozen pre-growth model (an NNX module; pass it through nnx.split/merge or
        close over it).
      batch: SeedingBatch of B rows.
      rng: PRNG key for sampling.
      mask: trainable mask (pytree like state.params) or None.
      imitation: the Learning-to-Imitate rollout (rewards and advantages attached) or None.
    Returns:
      (new state, metrics dict with the divergence, token count, completion length,
      ``skipped`` (1 when a non-finite loss or gradient left the state unchanged:
      ``train.finite.skip_if_nonfinite``); with imitation, its policy loss and mean reward;
      with expert slots, the mean gate and expert output RMS on memory rows and on replay
      rows, 0 for a kind absent from the batch).
    """
    student = state.model()
    if cfg.teacher == "self":  # OPSD: the live weights teach (their logits are stop-gradient)
        teacher = student
    aligned = collect(student, teacher, batch, rng, cfg, eos_id=eos_id, pad_id=pad_id)
    teacher_bmv = jax.lax.stop_gradient(align.gather_completion_logits(
        _logits(teacher, aligned.teacher), aligned.teacher.completion_pos))
    # replay rows carry no memory: a teacher prefix as long as the student's
    replay = batch.teacher_len == batch.student_len
    return seeding_update(state, teacher_bmv, aligned.student, aligned.completion_mask, replay,
                          mask, imitation, cfg=cfg)


def seeding_update(state: TrainState, teacher_bmv, rows: align.Rows, completion_mask,
                   replay_b, mask=None, imitation=None, *, cfg: SeedingConfig):
    """The UPDATE of a seeding step on completions already collected: the student ``rows``
    (prompt + completion) against the teacher's logits per completion token [B,M,V]
    (``seeding_step`` samples them; ``distill.cache`` reads them from a teacher cache).
    ``replay_b`` [B] bool marks replay rows (for the per-kind expert metrics). Returns
    (new state, metrics) as ``seeding_step``."""
    student = state.model()
    slots = _has_slots(student)
    if (cfg.gate_l1 or cfg.expert_l1) and not slots:
        raise ValueError(f"gate_l1={cfg.gate_l1} / expert_l1={cfg.expert_l1} charge the expert "
                         "slots' activity: the student must declare the 'experts' capability "
                         "(a sleep_jax Decoder with expert_slots >= 1)")

    # A TrainState trains its params; an AdapterState (``sleep_jax.train.adapters``) trains an
    # adapter that ``full_params`` writes into the frozen model's slot.
    compose = getattr(state, "full_params", None)

    def loss_fn(params):
        full = params if compose is None else compose(params)
        model = nnx.merge(state.graphdef, full, state.other)
        s, c, gate_row, rms_row = divergence_and_experts(model, teacher_bmv, rows,
                                                         completion_mask, cfg)
        loss = cfg.alpha * s / jnp.maximum(c, 1.0)
        if cfg.gate_l1:
            loss = loss + cfg.gate_l1 * jnp.mean(gate_row)
        if cfg.expert_l1:
            loss = loss + cfg.expert_l1 * jnp.mean(rms_row)
        pg = jnp.zeros(())
        if imitation is not None:
            from sleep_jax.rl.update import grpo_loss, loss_norms

            rl = cfg.rl_config()
            pg, _ = grpo_loss(full, imitation, graphdef=state.graphdef, other=state.other,
                              cfg=rl, norms=loss_norms(imitation, rl))
            loss = loss + (1.0 - cfg.alpha) * pg
        return loss, (s, c, pg, (gate_row, rms_row))

    (loss, (s, c, pg, (gate_row, rms_row))), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state, skipped = skip_if_nonfinite(apply_gradients(state, grads, mask), state, loss, grads)
    metrics = {"loss": loss, "divergence": s / jnp.maximum(c, 1.0), "tokens": c,
               "skipped": skipped,
               "completion_len": jnp.mean(jnp.sum(completion_mask, 1))}
    if imitation is not None:
        metrics["imitation_loss"] = pg
        metrics["imitation_reward"] = jnp.mean(imitation.rewards)
    if slots:
        replay = replay_b.astype(jnp.float32)
        for name, row in (("gate", gate_row), ("expert_rms", rms_row)):
            metrics[f"{name}_memory_rows"] = (jnp.sum(row * (1 - replay))
                                              / jnp.maximum(jnp.sum(1 - replay), 1.0))
            metrics[f"{name}_replay_rows"] = (jnp.sum(row * replay)
                                              / jnp.maximum(jnp.sum(replay), 1.0))
    return state, metrics


def make_seeding_step(cfg: SeedingConfig, state: TrainState, mesh, *, eos_id: int | None,
                      pad_id: int = 0, rules=None):
    """``step(state, teacher_graphdef, teacher_state, batch, rng, mask, imitation=None)
    -> (state, metrics)``.

    Jitted with the student state's shardings on ``mesh`` for input and output (so the second
    step does not recompile) and the state donated. A host (numpy) batch is placed with its
    rows over the mesh's batch axes, each process placing only its rows
    (``runtime.shard_rows``). The teacher travels as
    ``nnx.split(teacher)``: its graphdef is static, its state an argument.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from sleep_jax.runtime import shard_rows
    from sleep_jax.train.state import train_state_shardings

    state_sh = (state.shardings(mesh, rules) if hasattr(state, "shardings")
                else train_state_shardings(state, mesh, rules))
    repl = NamedSharding(mesh, PartitionSpec())

    def step(state, teacher_graphdef, teacher_state, batch, rng, mask, imitation):
        teacher = nnx.merge(teacher_graphdef, teacher_state)
        return seeding_step(state, teacher, batch, rng, mask, imitation, cfg=cfg,
                            eos_id=eos_id, pad_id=pad_id)

    jitted = jax.jit(step, static_argnums=(1,), donate_argnums=(0,),
                     out_shardings=(state_sh, repl))

    def run(state, teacher_graphdef, teacher_state, batch, rng, mask, imitation=None):
        state = jax.device_put(state, state_sh)  # a no-op once the state lives there
        # a host batch: rows over the batch axes, each process placing only its rows
        batch = shard_rows(batch, mesh, rules)
        with jax.set_mesh(mesh):
            return jitted(state, teacher_graphdef, teacher_state, batch, rng, mask, imitation)

    run.jitted = jitted
    return run


def run_seeding(state: TrainState, teacher: nnx.Module, batches, steps: int, *, mesh,
                cfg: SeedingConfig, eos_id: int | None, pad_id: int = 0, mask=None, rng=None,
                every: int = 0, callback=None, desc: str = "sleep: seeding",
                decode=None, judge=None, workdir: str | None = None, log_every: int = 10,
                progress_bar: bool = True):
    """Run ``steps`` seeding steps on ``batches`` on the run loop (``sleep_jax.train.loop``).

    ``batches`` is an iterator of SeedingBatch or a loop batch source (e.g. an ``RngSource``,
    which resumes exactly). ``callback(step, state)`` runs every ``every`` steps and at the end
    (e.g. an evaluation; a returned dict of floats joins that step's record). With
    cfg.alpha < 1 each step first collects a Learning-to-Imitate rollout (``imitation.py``),
    which needs ``decode(ids) -> str`` and, when cfg.gamma > 0, a ``judge``. Metrics are read
    from the device every ``log_every`` steps; with a ``workdir`` the run writes metrics.jsonl,
    TensorBoard and checkpoints there and a re-run resumes. Returns (state, step_times) where
    step_times are wall seconds per step (the first includes compile; between log steps the
    window's mean).
    """
    from sleep_jax.train.loop import LoopConfig, run_loop

    step_fn = make_seeding_step(cfg, state, mesh, eos_id=eos_id, pad_id=pad_id)
    tg, ts = nnx.split(teacher)
    rng = jax.random.key(0) if rng is None else rng
    jmask = None if mask is None else jax.tree.map(jnp.asarray, mask)
    collect_imitation = None
    if cfg.alpha < 1.0:
        from sleep_jax.distill.imitation import make_imitation

        if decode is None:
            raise ValueError(f"alpha={cfg.alpha} < 1 uses Learning to Imitate, whose reward "
                             "reads text: pass decode=")
        collect_imitation = make_imitation(cfg, decode=decode, judge=judge, eos_id=eos_id,
                                           pad_id=pad_id)

    def one_step(st, batch, key):
        imit = None
        if collect_imitation is not None:
            imit = collect_imitation(st, tg, ts, batch, jax.random.fold_in(key, 1))
        return step_fn(st, tg, ts, batch, key, jmask, imit)

    eval_fn = None
    if callback is not None and every:
        def eval_fn(step, st):
            out = callback(step, st)
            return out if isinstance(out, dict) else {}

    loop_cfg = LoopConfig(steps=steps, log_every=log_every, eval_every=every,
                          progress_bar=progress_bar)
    r = run_loop(one_step, state, batches, cfg=loop_cfg, rng=rng, workdir=workdir,
                 eval_fn=eval_fn, desc=desc)
    return r.state, r.times
