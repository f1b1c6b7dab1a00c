"""Rehearsal: at sleep, a trained generator dreams about the NEW memories and the kept dreams
train this sleep's expert slot further, mixed with replay rows (issue 12, item 6).

Consolidation (Knowledge Seeding, ``sleep.sleep``) always runs first; rehearsal continues from
its result, the sleep's ``AdapterState`` of slot e:

1. DREAM (``dream_memories``). A copy of the consolidated model gets two more slots on: the
   generator slot, holding the trained generator adapter (``dream.generator``, written by
   ``sleep-jax dream``), and the inner slot the selection's gradients are taken in
   (``grow.activate_slot``: A random, B = 0, so neither changes the model's function before
   the generator adapter is written in). A model with fewer than two free slots is grown by
   the missing ones first, in the copy only (function preserving; the sleep's model keeps its
   slot count). A generator of lower expert rank than the model is zero-padded along its rank:
   the extra columns of A and rows of B are 0, silu(0) = 0, so the slot computes exactly what
   it computed at its own rank. A higher rank, other leaves (a router on one side only) or
   other sizes are refused, naming the leaf. Each memory's text is a context C (no question
   is needed): ``iteration.generate_and_select`` samples m dreams from the generator prompted
   with the dream template around C, scores each by its SFT gradient against C's over the
   inner adapter (``select``: cosine by default) and keeps the top-k plus b random, ``rounds``
   times per memory with fresh keys. Kept dreams become token rows [BOS] + dream, as the inner
   loop trains them. The share of kept dreams that copy C verbatim (``select.copies_context``)
   is reported.
2. REHEARSE (``rehearse_step`` on ``train.loop.run_loop``). The SAME slot keeps training as
   the SAME adapter tree (the sleep's ``AdapterState``: adapter, frozen parameters, slot index)
   with a FRESH optimizer (``RehearseConfig.optim``: its own warmup and cosine over ``steps``).
   Fresh, not continued: the consolidation's schedule has decayed to its end by then, and its
   Adam moments belong to another objective. Each batch of B rows holds Bd = B - Br dream rows
   and Br = round(f * B) replay rows (f = ``replay_fraction``; Br = 0 without replay rows):

       loss = (Bd / B) * mean NLL over the dream rows' tokens
              + (Br / B) * D(teacher || student) over the replay rows' completion tokens,

   the second term being the sleep's seeding loss on rows without memory (completions of the
   replay prompts by the lambda-mix, divergence to the pre-sleep teacher:
   ``distill.seeding.collect`` / ``gkd_loss`` with the sleep's SeedingConfig). Each term is a
   mean over its own tokens, weighted by its share of rows, so ``replay_fraction`` means what it
   says whatever the lengths (dream rows are ~Mx tokens, replay completions M). The replay rows
   are the sleep's own: its wake-knowledge prompts and every earlier sleep's seeding prompts.

Data discipline (issue 12, item 7): the only inputs are the memories' texts, the dream
template and the sleep's replay prompts. A memory whose text contains a probe question is not
dreamed about, and a kept dream or replay row whose decoded text contains one is dropped
(counted), so no probe question enters generation or rehearsal rows.

Shapes: N memories, Nc contexts per dreaming call, P prompt width, Tc context width, m dreams,
Mx dream length, k + b kept, B batch rows (Bd dream rows of width T, Br replay rows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sleep_jax.distill import seeding
from sleep_jax.dream.config import DreamConfig
from sleep_jax.runtime import barrier, host_read, is_writer, shard_rows
from sleep_jax.train.adapters import AdapterState
from sleep_jax.train.optim import OptimConfig

DREAMS_FILE = "dreams.jsonl"  # in the rehearsal workdir: the kept dreams (reused on resume)


@dataclasses.dataclass(frozen=True)
class RehearseConfig:
    """Rehearsal after consolidation (off while ``generator`` is "").

    generator: the folder ``sleep-jax dream`` writes as DIR/model (the checkpoint with
      ``dream_generator.npz``); its base must have the sleep model's sizes and tokenizer.
    steps / batch_size: rehearsal steps and rows per batch.
    replay_fraction: share f of each batch's rows that are replay rows (module docstring).
    rounds: generate-and-select draws per memory (each keeps dream.keep_top + keep_random).
    contexts_per_call: memories per jitted dreaming call (the last call is padded by repeats).
    dream_template: the dream prompt around the memory ({context}); "" = the one the generator
      was trained with (its config.json).
    temperature / top_k: the generator's sampling (top_k 0: off).
    route_noise: routing noise while dreaming (``dream.noise``): at every token one of the
      consolidated model's trained slots (this sleep's included), drawn at random, has its
      output scaled by 1 + route_noise; 0 (default) turns it off.
    optim: the fresh optimizer of the slot during rehearsal.
    dream: m dreams, keep top-k + b random, the importance score, the dream length
      (``DreamConfig``; its inner-loop and reward fields are not used at sleep).
    seed: keys of dreaming and of the rehearsal batches.
    """

    generator: str = ""
    steps: int = 50
    batch_size: int = 16
    replay_fraction: float = 0.5
    rounds: int = 1
    contexts_per_call: int = 4
    dream_template: str = ""
    temperature: float = 1.0
    top_k: int = 0
    route_noise: float = 0.0
    optim: OptimConfig = OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0)
    dream: DreamConfig = DreamConfig()
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "rounds", "contexts_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"RehearseConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"RehearseConfig.replay_fraction={self.replay_fraction} must be in "
                             f"[0, 1)")
        if int(round(self.replay_fraction * self.batch_size)) >= self.batch_size:
            raise ValueError(f"RehearseConfig.replay_fraction={self.replay_fraction} leaves no "
                             f"dream row in a batch of {self.batch_size}")
        if self.temperature <= 0 or self.top_k < 0 or self.route_noise < 0:
            raise ValueError(f"RehearseConfig temperature={self.temperature} must be > 0, "
                             f"top_k={self.top_k} and route_noise={self.route_noise} >= 0")
        if self.dream_template and "{context}" not in self.dream_template:
            raise ValueError(f"RehearseConfig.dream_template={self.dream_template!r} must "
                             f"contain {{context}}")

    @property
    def enabled(self) -> bool:
        return bool(self.generator)


# ------------------------------------------------------------------------------ data discipline


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def contains_probe(text: str, questions: Sequence[str]) -> bool:
    """True when ``text`` contains one of ``questions`` (case and whitespace normalised)."""
    t = _norm(text)
    return any(q and q in t for q in (_norm(q) for q in questions))


# ------------------------------------------------------------------------------------ generator


def fit_generator(template: nnx.State, adapter: dict) -> nnx.State:
    """The saved generator adapter ({leaf path: array}) shaped like ``template`` (the adapter
    of a slot of the model it will sit in), zero-padded along "expert_rank" when its rank is
    lower (exact: module docstring). Other differences are refused, naming the leaf."""
    names = set(template.keys())
    if names != set(adapter):
        raise ValueError(f"generator leaves {sorted(adapter)} do not match the model's slot "
                         f"leaves {sorted(names)} (a router on one side only?)")
    out = {}
    for k, v in template.items():
        want, axes = v[...].shape, tuple(v.get_metadata()["logical_axes"])
        x = np.asarray(adapter[k])
        bad = x.ndim != len(want)
        pad = []
        for ax, (g, w) in enumerate(zip(x.shape, want) if not bad else ()):
            if g == w:
                pad.append((0, 0))
            elif axes[ax] == "expert_rank" and g < w:
                pad.append((0, w - g))
            else:
                bad = True
        if bad:
            raise ValueError(f"generator leaf {k!r} has shape {x.shape}; the model's slot "
                             f"needs {want} (axes {axes}): the generator must come from a model "
                             f"of the same sizes, of expert rank at most the model's")
        out[k] = nnx.Param(jnp.asarray(np.pad(x, pad), v[...].dtype), logical_axes=axes)
    return nnx.State(out)


def dream_model(model: nnx.Module, adapter: dict, rng, *, mesh=None):
    """(generator AdapterState, inner slot, adapter0) on a copy of ``model`` (step 1 of the
    module docstring): two free slots turned on (the copy grown when fewer are free), the
    generator adapter written into the first as its trained tree."""
    from sleep_jax.dream.inner import make_base
    from sleep_jax.dream.iteration import check_generator
    from sleep_jax.grow import activate_slot, grow_model
    from sleep_jax.grow.experts import used_slots
    from sleep_jax.train.adapters import create_adapter_state

    cfg = model.config
    if not cfg.expert_slots:
        raise ValueError("rehearsal dreams in expert slots: the model has none")
    k_grow, k_gen, k_inner = jax.random.split(rng, 3)
    free = lambda m: [e for e in range(m.config.expert_slots) if e not in used_slots(m)]
    if len(free(model)) < 2:
        dst = cfg.replace(expert_slots=cfg.expert_slots + 2 - len(free(model)))
        if mesh is None:
            from sleep_jax.mesh import make_mesh

            mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
        model, _ = grow_model(model, cfg, dst, mesh=mesh, rng=k_grow)
    g, i = free(model)[:2]
    model, _ = activate_slot(model, None, g, k_gen)
    model, _ = activate_slot(model, None, i, k_inner)
    gen = create_adapter_state(model, g, optax.identity())
    gen = gen.replace(params=fit_generator(gen.params, adapter))
    if mesh is not None:  # the host-built adapter onto the mesh with the rest of the state
        gen = jax.device_put(gen, gen.shardings(mesh))
    check_generator(gen, i)
    return gen, i, make_base(model, i)[1]


# ----------------------------------------------------------------------------------------- dream


@dataclasses.dataclass
class Dreams:
    """The kept dreams of a sleep's memories (host side).

    rows: [BOS] + dream token ids, the rehearsal rows (dreams dropped below are not in them);
    texts / memory_ids / copies / scores: per row. kept: dreams the selection kept (rows plus
    the dropped); copy_share: of the kept dreams, those copying their memory verbatim;
    dropped_probe / dropped_empty: kept dreams left out for containing a probe question or for
    having no token; contexts: memories dreamed about; contexts_dropped: memories left out
    because their text contains a probe question; prompts: the generation prompts (text);
    noise_slots: the slots routing noise drew from ([] when off).
    """

    rows: list[list[int]]
    texts: list[str]
    memory_ids: list[str]
    copies: list[bool]
    scores: list[float]
    kept: int = 0
    copy_share: float = 0.0
    dropped_probe: int = 0
    dropped_empty: int = 0
    contexts: int = 0
    contexts_dropped: int = 0
    prompts: list[str] = dataclasses.field(default_factory=list)
    noise_slots: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        keys = ("kept", "copy_share", "dropped_probe", "dropped_empty", "contexts",
                "contexts_dropped", "noise_slots", "seconds")
        return {k: getattr(self, k) for k in keys} | {"rows": len(self.rows)}


def write_dreams(path: str, dreams: Dreams) -> str:
    """The dreams as JSONL: a summary line, then one line per row (atomic)."""
    from sleep_jax.atomic import write_text

    lines = [json.dumps({"summary": dreams.summary(), "prompts": dreams.prompts})]
    lines += [json.dumps({"memory_id": m, "text": t, "ids": r, "copy": c, "score": s})
              for r, t, m, c, s in zip(dreams.rows, dreams.texts, dreams.memory_ids,
                                       dreams.copies, dreams.scores)]
    return write_text(path, "".join(x + "\n" for x in lines))


def read_dreams(path: str) -> Dreams:
    with open(path) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    head, rest = recs[0], recs[1:]
    s = {k: v for k, v in head["summary"].items() if k != "rows"}
    return Dreams(rows=[r["ids"] for r in rest], texts=[r["text"] for r in rest],
                  memory_ids=[r["memory_id"] for r in rest], copies=[r["copy"] for r in rest],
                  scores=[r["score"] for r in rest], prompts=head["prompts"], **s)


def context_arrays(texts: Sequence[str], encode: Callable[[str], Sequence[int]], *,
                   template: str, bos_id: int, pad_id: int, chunk: int) -> dict:
    """Host arrays of the contexts, padded to a multiple of ``chunk`` rows by repeating the
    first (``real`` says how many are real): prompt [N',P] = [BOS] + template(C) right-padded,
    prompt_len [N'], ctx [N',Tc] = [BOS] + C left-aligned, ctx_mask [N',Tc]."""
    from sleep_jax.data.tokenizers import pad_rows

    n = len(texts)
    total = -(-n // chunk) * chunk
    idx = list(range(n)) + [0] * (total - n)
    prompts = [[bos_id, *encode(template.format(context=texts[i]))] for i in idx]
    ctxs = [[bos_id, *encode(texts[i])] for i in idx]
    p, pl = pad_rows(prompts, pad_id=pad_id, where="dream prompt ([BOS] + template(memory))")
    c, cl = pad_rows(ctxs, pad_id=pad_id, where="dream context ([BOS] + memory)")
    return {"prompt": p, "prompt_len": pl, "ctx": c,
            "ctx_mask": np.arange(c.shape[1])[None] < cl[:, None], "real": n}


def dream_memories(model: nnx.Module, generator, tokenizer, memories, *, cfg: RehearseConfig,
                   tokens: dict, rng, probe_questions: Sequence[str] = (), mesh=None) -> Dreams:
    """Kept dreams about every memory (step 1 of the module docstring).

    Args:
      model: the consolidated model (read only; dreaming works on a copy).
      generator: ``dream.generator.read_generator_adapter`` output (cfg, adapter, info, vocab).
      tokenizer: ``encode(text, add_special_tokens=False).ids``, ``decode(ids)``.
      memories: ``id``/``text`` objects.
      tokens: {"bos_id", "eos_id", "pad_id"} (a missing bos is the pad id, as the sleep's).
      rng: PRNG key.
      probe_questions: memories containing one are not dreamed about; dreams containing one
        are dropped.
    """
    from sleep_jax.dream.iteration import DreamBatch, generate_and_select
    from sleep_jax.dream.noise import RoutingNoise
    from sleep_jax.grow.experts import used_slots
    from sleep_jax.rl.config import RLConfig

    t0 = time.perf_counter()
    _, adapter, info, vocab = generator
    if vocab is not None and hasattr(tokenizer, "get_vocab") and tokenizer.get_vocab() != vocab:
        raise ValueError(f"the generator's tokenizer ({len(vocab)} tokens) is not the sleep "
                         f"model's ({len(tokenizer.get_vocab())} tokens)")
    pad = tokens.get("pad_id") or 0
    bos = tokens.get("bos_id")
    bos = pad if bos is None else bos
    eos = tokens.get("eos_id")
    template = cfg.dream_template or info.get("dream_template") or "{context}"
    keep = [m for m in memories if not contains_probe(m.text, probe_questions)]
    out = Dreams([], [], [], [], [], contexts=len(keep),
                 contexts_dropped=len(memories) - len(keep),
                 prompts=[template.format(context=m.text) for m in keep])
    if not keep:
        out.seconds = time.perf_counter() - t0
        return out
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    arr = context_arrays([m.text for m in keep], enc, template=template, bos_id=bos,
                         pad_id=pad, chunk=cfg.contexts_per_call)
    out.noise_slots = used_slots(model) if cfg.route_noise > 0 else []  # the trained ones
    if mesh is None:
        from sleep_jax.mesh import make_mesh

        mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    gen, islot, a0 = dream_model(model, adapter, jax.random.fold_in(rng, 0), mesh=mesh)
    rl = RLConfig(algorithm="grpo", temperature=cfg.temperature, top_k=cfg.top_k)
    max_len = arr["prompt"].shape[1] + cfg.dream.max_dream_tokens + 1

    @jax.jit
    def draw(g, a, batch, key):
        k_noise, key = jax.random.split(key)
        policy = None
        if out.noise_slots:  # routing noise: the sampler only (dream.noise)
            policy = RoutingNoise(g.model(), out.noise_slots, scale=cfg.route_noise,
                                  key=k_noise, max_len=max_len)
        _, sel = generate_and_select(g, islot, a, batch, key, cfg=cfg.dream, rl=rl, bos_id=bos,
                                     eos_id=eos, pad_id=pad, policy=policy)
        return {k: sel[k] for k in ("tokens", "mask", "scores", "keep", "copies")}

    C = cfg.contexts_per_call
    calls = arr["prompt"].shape[0] // C
    copies = []
    for r in range(cfg.rounds):
        for c in range(calls):
            sl = slice(c * C, (c + 1) * C)
            # the same contexts on every process, each placing its rows; results read whole
            batch = DreamBatch(*shard_rows([arr[k][sl] for k in
                                            ("prompt", "prompt_len", "ctx", "ctx_mask")],
                                           mesh))
            res = host_read(draw(gen, a0, batch, jax.random.fold_in(rng, 1 + r * calls + c)))
            for n in range(C):
                if c * C + n >= arr["real"]:
                    break  # a padded repeat
                mem = keep[c * C + n]
                for j in res["keep"][n]:
                    ids = [int(t) for t in res["tokens"][n, j][res["mask"][n, j]]]
                    copies.append(bool(res["copies"][n, j]))
                    if not ids:
                        out.dropped_empty += 1
                        continue
                    text = tokenizer.decode(ids)
                    if contains_probe(text, probe_questions):
                        out.dropped_probe += 1
                        continue
                    out.rows.append([bos, *ids])
                    out.texts.append(text)
                    out.memory_ids.append(mem.id)
                    out.copies.append(copies[-1])
                    out.scores.append(float(res["scores"][n, j]))
    out.kept = len(copies)
    out.copy_share = float(np.mean(copies)) if copies else 0.0
    out.seconds = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------- rehearse


class RehearseBatch(NamedTuple):
    """tokens [Bd,T] int32 / mask [Bd,T] bool: dream rows ([BOS] + dream, left-aligned);
    replay: a ``seeding.SeedingBatch`` of Br rows without memory, or None (Br = 0)."""

    tokens: np.ndarray
    mask: np.ndarray
    replay: seeding.SeedingBatch | None


def batch_fn(dream_rows: Sequence[Sequence[int]], replay_rows: Sequence[Sequence[int]], *,
             batch_size: int, fraction: float, bos_id: int, pad_id: int = 0):
    """``fn(np_rng) -> RehearseBatch``: Br = round(fraction * B) replay rows (0 when there are
    none) and Bd = B - Br dream rows, each drawn uniformly with replacement. ``replay_rows``
    are prompt ids (no BOS: ``seeding.make_batch`` adds it to teacher and student prefix)."""
    from sleep_jax.data.tokenizers import pad_rows

    if not dream_rows:
        raise ValueError("no dream rows to rehearse")
    B = batch_size
    n_rep = int(round(fraction * B)) if replay_rows else 0
    if n_rep >= B:
        raise ValueError(f"replay fraction {fraction} leaves no dream row in a batch of {B}")
    T = max(map(len, dream_rows))
    Q = max(map(len, replay_rows)) + 1 if n_rep else 0

    def fn(rng: np.random.Generator) -> RehearseBatch:
        d = [dream_rows[i] for i in rng.integers(0, len(dream_rows), B - n_rep)]
        toks, lens = pad_rows(d, pad_id=pad_id, width=T, where="dream row")
        rep = None
        if n_rep:
            r = [replay_rows[i] for i in rng.integers(0, len(replay_rows), n_rep)]
            rep = seeding.make_batch([[]] * n_rep, r, bos_id=bos_id, teacher_len=Q,
                                     student_len=Q, pad_id=pad_id)
        return RehearseBatch(toks, np.arange(T)[None] < lens[:, None], rep)

    return fn


def dream_nll(model, tokens_bt, mask_bt):
    """(sum, count) of the next-token NLL over the dream rows' valid tokens after the first."""
    from sleep_jax.train.loss import cross_entropy

    B, T = tokens_bt.shape
    valid = mask_bt[:, :-1]
    pos = jnp.broadcast_to(jnp.arange(T - 1, dtype=jnp.int32), (B, T - 1))
    logits, _ = model(tokens_bt[:, :-1], pos, mask=valid)
    return cross_entropy(logits, tokens_bt[:, 1:], valid & mask_bt[:, 1:])


def rehearse_step(state: AdapterState, teacher: nnx.Module, batch: RehearseBatch, rng, *,
                  cfg: seeding.SeedingConfig, eos_id: int | None, pad_id: int = 0):
    """One rehearsal step (module docstring, step 2), pure: jit it with the keywords static.

    Returns (state, metrics): loss, lm_loss (mean NLL on the dream rows), divergence (on the
    replay rows; 0 without), dream_tokens, skipped (1: a non-finite loss or gradient left the
    state unchanged).
    """
    from sleep_jax.train.finite import skip_if_nonfinite
    from sleep_jax.train.state import apply_gradients

    Bd = batch.tokens.shape[0]
    Br = 0 if batch.replay is None else batch.replay.student_prefix.shape[0]
    w = Br / (Bd + Br)
    student = state.model()
    aligned = teacher_logits = None
    if Br:
        tch = student if cfg.teacher == "self" else teacher
        aligned = seeding.collect(student, tch, batch.replay, rng, cfg, eos_id=eos_id,
                                  pad_id=pad_id)
        t = aligned.teacher
        teacher_logits = jax.lax.stop_gradient(tch(t.tokens, t.positions, mask=t.valid)[0])

    def loss_fn(params):
        model = nnx.merge(state.graphdef, state.full_params(params), state.other)
        s, c = dream_nll(model, batch.tokens, batch.mask)
        lm = s / jnp.maximum(c, 1.0)
        div = jnp.zeros(())
        if Br:
            ds, dc = seeding.gkd_loss(model, teacher_logits, aligned, cfg)
            div = ds / jnp.maximum(dc, 1.0)
        return (1.0 - w) * lm + w * div, (lm, div, c)

    (loss, (lm, div, c)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, skipped = skip_if_nonfinite(apply_gradients(state, grads), state, loss, grads)
    return state, {"loss": loss, "lm_loss": lm, "divergence": div, "dream_tokens": c,
                   "skipped": skipped}


def make_rehearse_step(state: AdapterState, mesh, *, cfg: seeding.SeedingConfig,
                       eos_id: int | None, pad_id: int = 0):
    """``step(state, teacher_graphdef, teacher_state, batch, rng) -> (state, metrics)``, jitted
    with the state's shardings on ``mesh`` in and out and the state donated (as the seeding
    step)."""
    from jax.sharding import NamedSharding, PartitionSpec

    state_sh = state.shardings(mesh)
    repl = NamedSharding(mesh, PartitionSpec())

    def step(st, tg, ts, batch, rng):
        return rehearse_step(st, nnx.merge(tg, ts), batch, rng, cfg=cfg, eos_id=eos_id,
                             pad_id=pad_id)

    jitted = jax.jit(step, static_argnums=(1,), donate_argnums=(0,),
                     out_shardings=(state_sh, repl))

    def run(st, tg, ts, batch, rng):
        st = jax.device_put(st, state_sh)
        with jax.set_mesh(mesh):
            return jitted(st, tg, ts, batch, rng)

    return run


@dataclasses.dataclass
class RehearseResult:
    state: AdapterState  # the slot after rehearsal (``state.model()``: written into its slot)
    dreams: Dreams
    history: list[dict]
    report: dict  # steps, status, dreams kept, copy share, times, losses, slot_change (the
    # L2 norm of the adapter's change during rehearsal)


def rehearse(state: AdapterState, teacher: nnx.Module, tokenizer, memories,
             replay_prompts: Sequence[Sequence[int]], *, cfg: RehearseConfig,
             seeding_cfg: seeding.SeedingConfig, tokens: dict,
             probe_questions: Sequence[str] = (), mesh=None, workdir: str | None = None,
             generator=None, log_every: int = 1, checkpoint_every: int = 0,
             keep_checkpoints: int = 2, progress_bar: bool = True,
             log_fn: Callable | None = None) -> RehearseResult:
    """Dream about ``memories`` with the generator, then train ``state``'s slot on the kept
    dreams mixed with replay rows (module docstring).

    Args:
      state: the consolidated sleep's ``AdapterState`` (its slot is the one trained).
      teacher: the pre-sleep model (the replay rows' teacher).
      tokenizer, memories, tokens, probe_questions: as ``dream_memories``.
      replay_prompts: the sleep's replay prompts as ids (``sleep.Rows.replay``'s prompts).
      cfg, seeding_cfg: rehearsal settings; the sleep's seeding settings (the replay loss).
      mesh: the student's mesh (default one device).
      workdir: rehearsal run folder (metrics.jsonl, train/, ``DREAMS_FILE``; re-running
        resumes, reusing the saved dreams).
      generator: ``read_generator_adapter`` output (default: read from ``cfg.generator``).
    Returns a ``RehearseResult``; with no dream row left, no step runs (status "no dreams").
    """
    from sleep_jax.dream.generator import read_generator_adapter
    from sleep_jax.mesh import make_mesh
    from sleep_jax.train.loop import LoopConfig, RngSource, read_metrics, run_loop
    from sleep_jax.train.optim import make_optimizer

    if not isinstance(state, AdapterState):
        raise ValueError(f"rehearsal trains the sleep's expert slot: got a "
                         f"{type(state).__name__} (a full fine-tune, SleepConfig.expert=False)")
    mesh = mesh or make_mesh("fsdp=1", devices=jax.devices()[:1])
    key = jax.random.key(cfg.seed + 5)
    path = None if workdir is None else os.path.join(workdir, DREAMS_FILE)
    found = path is not None and os.path.exists(path)
    barrier("sleep_jax_rehearse_dreams_checked")  # every process decided before any writes
    if found:
        dreams = read_dreams(path)
    else:
        generator = generator or read_generator_adapter(cfg.generator)
        dreams = dream_memories(state.model(), generator, tokenizer, memories, cfg=cfg,
                                tokens=tokens, rng=jax.random.fold_in(key, 0),
                                probe_questions=probe_questions, mesh=mesh)
        if path is not None and is_writer():
            os.makedirs(workdir, exist_ok=True)
            write_dreams(path, dreams)
    replay = [list(p) for p in replay_prompts
              if not contains_probe(tokenizer.decode(list(p)), probe_questions)]
    report = {"dreams": dreams.summary(), "replay_rows": len(replay),  # + 4 kept dreams
              "samples": [f"{m}: {t}" for m, t in zip(dreams.memory_ids, dreams.texts[:4])],
              "replay_dropped_for_probe_overlap": len(replay_prompts) - len(replay),
              "steps": 0, "status": "no dreams", "seconds": dreams.seconds,
              "dream_s": dreams.seconds, "step_s": None}
    if not dreams.rows:
        return RehearseResult(state, dreams, [], report)
    pad = tokens.get("pad_id") or 0
    bos = tokens.get("bos_id")
    bos = pad if bos is None else bos
    tx = make_optimizer(cfg.optim, cfg.steps)
    st = state.replace(opt_state=tx.init(state.params), step=jnp.zeros((), jnp.int32), tx=tx)
    step_fn = make_rehearse_step(st, mesh, cfg=seeding_cfg, eos_id=tokens.get("eos_id"),
                                 pad_id=pad)
    tg, ts = nnx.split(teacher)
    source = RngSource(batch_fn(dreams.rows, replay, batch_size=cfg.batch_size,
                                fraction=cfg.replay_fraction, bos_id=bos, pad_id=pad),
                       np.random.default_rng(cfg.seed + 23))
    lcfg = LoopConfig(steps=cfg.steps, log_every=log_every, checkpoint_every=checkpoint_every,
                      keep_checkpoints=keep_checkpoints, progress_bar=progress_bar,
                      seed=cfg.seed, tensorboard=False)
    # host copy (the step donates the state); host_read: also when it spans processes
    start = jax.tree.map(lambda x: np.array(x, copy=True), host_read(st.params))
    t0 = time.perf_counter()
    res = run_loop(lambda s, b, k: step_fn(s, tg, ts, b, k), st, source, cfg=lcfg,
                   rng=jax.random.fold_in(key, 1), workdir=workdir, desc="sleep: rehearsal",
                   log_fn=log_fn)
    train_s = time.perf_counter() - t0
    history = res.history
    if workdir is not None:
        history = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    lm = [r["lm_loss"] for r in history if "lm_loss" in r]
    from sleep_jax.train.loop import typical_step_s

    moved = jax.tree.map(lambda a, b: float(np.sum((np.asarray(a, np.float64)
                                                    - np.asarray(b, np.float64)) ** 2)),
                         host_read(res.state.params), start)
    report.update(steps=res.step, status=res.status, train_s=train_s,
                  slot_change=float(np.sqrt(sum(jax.tree.leaves(moved)))),
                  seconds=dreams.seconds + train_s,
                  step_s=typical_step_s(res.times) if len(res.times) > 3 else None,
                  lm_loss_first=lm[0] if lm else None, lm_loss_last=lm[-1] if lm else None)
    return RehearseResult(res.state, dreams, history, report)
