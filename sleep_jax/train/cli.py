"""``sleep-jax train``: train a model from a config file; re-running the command resumes.

  sleep-jax train --config configs/train.py:tiny --workdir runs/tiny [--config.train.steps=100]
      [--config.data.source=jsonl --config.data.path=texts.jsonl] [--allow_config_change]

Data: ``builtin`` (generated sentences, so the command runs with defaults), ``jsonl`` (one
``{"text": ...}`` per line) or ``tfds`` (an array_record dataset: ``data.path`` is the prepared
dataset's directory, or ``data.tfds_name`` a name under the data_dir ``data.path``). The run
folder gets config.json, tokenizer.json, metrics.jsonl, tb/, train/ (checkpoints) and, at the
end, model/ (the checkpoint directory format of sleep_jax.models.checkpoint_dir).

Many processes (``sleep-jax launch --nproc 2 -- sleep-jax train ...``, or a pod): the mesh
spans every process's devices, each process feeds its rows of each global batch, process 0
writes the files, all save the checkpoints; the runtime flags (``--distributed``,
``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--init_timeout_s``) override
the environment (sleep_jax.runtime).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from sleep_jax.config import (
    RUNTIME_FLAGS,
    ConfigError,
    Flag,
    check_run_config,
    default_config_path,
    from_section,
    model_config,
    parse_command,
    rules_from_section,
    runtime_config,
    write_run_config,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes batches (see sleep_jax.data)."""

    source: str = "builtin"  # builtin | jsonl | tfds
    path: str = ""  # JSONL file {"text": ...} (source=jsonl); data_dir for tfds
    tfds_name: str = ""
    split: str = "train"
    tokenizer: str = "byte"  # byte | word
    pack: bool = True
    eval_fraction: float = 0.05
    builtin_sentences: int = 2000

# ---------------------------------------------------------------------------------- built-in text

_SUBJECTS = ("the cat", "the dog", "a bird", "the old man", "my sister", "the teacher", "a fox",
             "the baker", "our neighbour", "the child")
_VERBS = ("sees", "likes", "finds", "follows", "paints", "calls", "helps", "watches")
_OBJECTS = ("the red ball", "a small house", "the river", "an apple", "the blue door",
            "a green hat", "the garden", "a wooden boat")
_PLACES = ("in the morning", "at night", "near the park", "after school", "on sunday",
           "by the sea")


def builtin_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` generated sentences (subject verb object place.), deterministic in ``seed``."""
    import numpy as np

    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = (f"{_SUBJECTS[r.integers(len(_SUBJECTS))]} {_VERBS[r.integers(len(_VERBS))]} "
             f"{_OBJECTS[r.integers(len(_OBJECTS))]} {_PLACES[r.integers(len(_PLACES))]}.")
        out.append(s[0].upper() + s[1:])
    return out


class _Slice(Sequence):
    """A view of ``seq[start:stop]`` for random-access sources that cannot slice."""

    def __init__(self, seq, start: int, stop: int):
        self._seq, self._start, self._len = seq, start, max(0, stop - start)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if not -self._len <= i < self._len:
            raise IndexError(i)
        return self._seq[self._start + (i % self._len)]


def load_examples(dcfg, seed: int) -> Sequence[str]:
    """The texts named by the data config (a random-access sequence of str)."""
    if dcfg.source == "builtin":
        return builtin_texts(dcfg.builtin_sentences, seed)
    if dcfg.source == "jsonl":
        if not dcfg.path:
            raise ConfigError("data.source='jsonl' needs --config.data.path=FILE.jsonl")
        if not os.path.isfile(dcfg.path):
            raise FileNotFoundError(f"data file {dcfg.path!r} not found (--config.data.path); "
                                    f"give a JSONL file with one {{\"text\": ...}} per line")
        from sleep_jax.data.jsonl import read_texts

        return [t.text for t in read_texts(dcfg.path)]
    if dcfg.source == "tfds":
        from sleep_jax.data.tfds_source import tfds_text_source

        if dcfg.tfds_name:
            return tfds_text_source(dcfg.tfds_name, split=dcfg.split, data_dir=dcfg.path or None)
        if not dcfg.path:
            raise ConfigError("data.source='tfds' needs data.path (a prepared dataset directory)"
                              " or data.tfds_name")
        return tfds_text_source(dcfg.path, split=dcfg.split)
    raise ConfigError(f"data.source={dcfg.source!r}; allowed: builtin, jsonl, tfds")


def make_tokenizer(dcfg, examples: Sequence[str], workdir: str, save: bool = True):
    """The run's tokenizer: reloaded from workdir/tokenizer.json on resume, else built (and
    saved there when ``save``: process 0; the others build the same one)."""
    from sleep_jax.data.tokenizers import (
        byte_level_tokenizer,
        load_tokenizer,
        save_tokenizer,
        word_level_tokenizer,
    )

    path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        return load_tokenizer(path)
    if dcfg.tokenizer == "byte":
        tok = byte_level_tokenizer()
    elif dcfg.tokenizer == "word":
        tok = word_level_tokenizer(examples[i] for i in range(len(examples)))
    else:
        raise ConfigError(f"data.tokenizer={dcfg.tokenizer!r}; allowed: byte, word")
    if save:
        save_tokenizer(tok, path)
    return tok


# ---------------------------------------------------------------------------------- main


FLAGS = (Flag("workdir", help="run folder (resumes when it has a run)", required=True),
         Flag("allow_config_change", bool, False,
              help="resume even though the saved config.json differs"), *RUNTIME_FLAGS)


def run(argv: list[str]) -> int:
    """Parse, build everything, train. Raises ConfigError/FileNotFoundError on bad input."""
    config, args = parse_command(argv, default=default_config_path("train.py:tiny"),
                                 flags=FLAGS, prog="sleep-jax train", doc=__doc__)
    if config is None:
        return 0  # --help
    from sleep_jax.train.optim import OptimConfig
    from sleep_jax.train.trainer import TrainConfig

    mcfg, ocfg, tcfg, dcfg = (model_config(config), from_section(OptimConfig, config.optim),
                              from_section(TrainConfig, config.train),
                              from_section(DataConfig, config.data))
    rules = rules_from_section(config.rules)
    workdir = args["workdir"]
    check_run_config(workdir, config, args["allow_config_change"])
    examples = load_examples(dcfg, tcfg.seed)  # fail on a missing file before writing anything

    from sleep_jax import runtime

    try:
        runtime.initialize(runtime_config(args))  # many processes: before any device use
    except ValueError as e:
        raise ConfigError(str(e)) from None
    import jax
    from flax import nnx

    from sleep_jax.data.pipeline import make_dataset, make_iterator
    from sleep_jax.mesh import batch_sharding, make_mesh
    from sleep_jax.models import Decoder
    from sleep_jax.train.optim import make_optimizer
    from sleep_jax.train.state import create_sharded_train_state
    from sleep_jax.train.trainer import fit

    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(f"config.mesh={config.mesh!r}: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tcfg.batch_size % (shards * tcfg.micro_batches):
        raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by "
                          f"micro_batches x data x fsdp = {tcfg.micro_batches} x {shards}")
    if dcfg.tokenizer not in ("byte", "word"):
        raise ConfigError(f"data.tokenizer={dcfg.tokenizer!r}; allowed: byte, word")
    writer = runtime.is_writer()
    if writer:
        write_run_config(workdir, config, args["allow_config_change"])
    tok = make_tokenizer(dcfg, examples, workdir, save=writer)
    vocab = tok.get_vocab_size()
    if vocab > mcfg.vocab:
        new = -(-vocab // 64) * 64
        log.warning("tokenizer has %d tokens > model.vocab=%d: using vocab %d", vocab,
                    mcfg.vocab, new)
        mcfg = mcfg.replace(vocab=new)
    n_eval = int(len(examples) * dcfg.eval_fraction) if tcfg.eval_every else 0
    train_src = _Slice(examples, 0, len(examples) - n_eval) if n_eval else examples
    # Every process runs the same global pipeline (shard (0, 1)) and feeds its rows of each
    # global batch (runtime.ShardedBatches): the batches, and so the run, do not depend on the
    # process count, and a checkpoint resumes on any count.
    data_sh = batch_sharding(mesh, 2, rules=rules)
    ds = make_dataset(train_src, tok, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                      seed=tcfg.seed, pack=dcfg.pack, shard=(0, 1))
    eval_batches = None
    if n_eval:
        eds = make_dataset(_Slice(examples, len(examples) - n_eval, len(examples)), tok,
                           seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed,
                           pack=dcfg.pack, shuffle=False, shard=(0, 1))
        it = make_iterator(eds)
        eval_batches = [runtime.shard_batch(next(it), mesh, data_sh)
                        for _ in range(tcfg.eval_batches)]

    tx = make_optimizer(ocfg, tcfg.steps)
    state = create_sharded_train_state(lambda: Decoder(mcfg, rngs=nnx.Rngs(tcfg.seed)), tx, mesh,
                                       rules)
    log.info("model %s: %d parameters on mesh %s", config.model.preset,
             sum(x.size for x in jax.tree.leaves(state.params)), dict(mesh.shape))
    batches = runtime.ShardedBatches(make_iterator(ds), mesh, data_sh)
    result = fit(state, batches, train_cfg=tcfg, optim_cfg=ocfg, mesh=mesh,
                 workdir=workdir, eval_batches=eval_batches, rules=rules)
    print(result.message, file=sys.stderr if result.status == "nonfinite" else sys.stdout)
    if result.status == "done":
        _export(workdir, result.state, tok)  # every process: each writes its shards
        if writer:
            print(f"outputs in {workdir}: model/, metrics.jsonl, tb/, train/ (checkpoints)")
    if result.history and writer:
        print(f"final loss {result.history[-1]['loss']:.4f} at step {result.step}")
    return 1 if result.status == "nonfinite" else 0


def _export(workdir: str, state, tok) -> None:
    from sleep_jax.models.checkpoint_dir import save_checkpoint

    save_checkpoint(os.path.join(workdir, "model"), state.model(), tok)


def main(argv: list[str]) -> int:
    """Entry point of ``sleep-jax train``; returns the exit status (2 on bad input)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sleep_jax").setLevel(logging.INFO)
    try:
        return run(list(argv))
    except (ConfigError, FileNotFoundError) as e:
        print(f"sleep-jax train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
