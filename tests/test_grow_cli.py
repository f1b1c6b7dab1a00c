"""`sleep-jax grow`: a saved checkpoint grows on a mesh and the saved result computes the same
function; a bad override fails with exit code 2 and a message naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.grow.cli import main
from sleep_jax.models import ModelConfig, create_model

ckpt = pytest.importorskip("sleep_jax.models.checkpoint_dir")

SRC = ModelConfig(vocab=64, embed=16, mlp=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  expert_rank=4, max_seq_len=64)


def test_cli_grows_a_checkpoint(tmp_path, capsys):
    model = create_model(SRC, seed=0)
    ckpt.save_checkpoint(tmp_path / "src", model)
    rc = main(["--checkpoint", str(tmp_path / "src"),
               "--config.to=layers=3,embed=32,expert_slots=2",
               "--out", str(tmp_path / "dst"), "--config.mesh=fsdp=4,tensor=2"])
    assert rc == 0
    grown, _, _ = ckpt.load_checkpoint(tmp_path / "dst")
    assert (grown.config.layers, grown.config.embed, grown.config.expert_slots) == (3, 32, 2)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, SRC.vocab)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    ref, out = model(tokens, positions)[0], grown(tokens, positions)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(ref))))

    rc = main(["--checkpoint", str(tmp_path / "src"), "--config.to=head_dim=16",
               "--out", str(tmp_path / "bad")])
    assert rc == 2 and "head_dim" in capsys.readouterr().err


def test_cli_refuses_bad_options_before_loading(tmp_path, capsys):
    rc = main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
               "--config.options.widht=zero"])
    assert rc == 2 and "unknown config key in --config.options.widht" in capsys.readouterr().err
    rc = main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
               "--config.options.width=wide"])
    assert rc == 2 and "width" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
