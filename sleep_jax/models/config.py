"""The frozen model config (every size growth changes) and the named presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and numerics of a Llama-family decoder.

    Letters: V vocab, D embed, F mlp, L layers, N heads, K kv heads, H head dim, E expert slots,
    R expert rank.
    """

    vocab: int = 256
    embed: int = 64
    mlp: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    # Low-rank expert slots beside each MLP (the paper's growth). 0 = off, no parameters, no cost.
    expert_slots: int = 0
    expert_rank: int = 64
    # A learned gate per token and slot, sigmoid(h . w_e + b_e), so a slot can be active only
    # where it is needed (the paper's MoE block implies routing; arXiv 2606.03979).
    expert_router: bool = False
    # Numerics: parameters are stored in param_dtype; matmuls run in dtype. fp32 on CPU; on
    # accelerators use dtype="bfloat16" with fp32 parameters.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Attention kernel: "xla" (einsum reference, runs everywhere) or "cudnn"/"auto" through
    # jax.nn.dot_product_attention (cuDNN flash attention on GPU).
    attention: str = "xla"
    # Rematerialisation of each layer in training: "none", "full" or "dots" (save matmuls).
    remat: str = "none"
    # Lower the layer scan fully unrolled (same math, one copy of the layer per layer in the
    # program): compile-time cost analysis then counts every layer (it counts a loop body once).
    # ``sleep-jax plan`` sets it; training keeps the scan.
    unroll_layers: bool = False

    def __post_init__(self):
        for name in ("vocab", "embed", "mlp", "layers", "heads", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name}={v!r}: must be a positive integer")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelConfig.heads={self.heads} must be a multiple of "
                             f"kv_heads={self.kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.attention not in ("xla", "cudnn", "auto"):
            raise ValueError(f"ModelConfig.attention={self.attention!r}; allowed: xla, cudnn, auto")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"ModelConfig.remat={self.remat!r}; allowed: none, full, dots")
        object.__setattr__(self, "expert_router", bool(self.expert_router))
        object.__setattr__(self, "unroll_layers", bool(self.unroll_layers))
        if self.expert_slots < 0 or self.expert_rank < 1:
            raise ValueError(f"expert_slots={self.expert_slots} must be >= 0 and "
                             f"expert_rank={self.expert_rank} >= 1")

    @property
    def groups(self) -> int:
        """Query heads per kv head (G = N / K)."""
        return self.heads // self.kv_heads

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (embeddings included), by formula; tests check it against eval_shape."""
    D, F, L, N, K, H, V = (cfg.embed, cfg.mlp, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim,
                           cfg.vocab)
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D
    experts = L * cfg.expert_slots * 2 * D * cfg.expert_rank
    return V * D * (1 if cfg.tie_embeddings else 2) + L * per_layer + D + experts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6 N + 12 L D T (PaLM, Chowdhery et al. 2022, appendix B).

    N all parameters (embeddings included, ``param_count``), L layers, D the attention width
    (heads x head_dim), T the sequence length: 6N is forward + backward of the matmuls, 12LDT
    the attention scores and weighted sum. The one definition of the MFU numerator
    (benchmarks/train_throughput.py, ``sleep-jax plan``).
    """
    return 6.0 * param_count(cfg) + 12.0 * cfg.layers * cfg.heads * cfg.head_dim * seq_len


PRESETS: dict[str, ModelConfig] = {
    # Test / CPU-demo size.
    "tiny": ModelConfig(),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): 134,515,008 parameters.
    "smollm2_135m": ModelConfig(vocab=49152, embed=576, mlp=1536, layers=30, heads=9,
                                kv_heads=3, head_dim=64, rope_theta=100_000.0, norm_eps=1e-5,
                                tie_embeddings=True, max_seq_len=8192),
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters.
    "llama_1b": ModelConfig(vocab=128256, embed=2048, mlp=8192, layers=16, heads=32, kv_heads=8,
                            head_dim=64, rope_theta=500_000.0,
                            rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), norm_eps=1e-5,
                            tie_embeddings=True, max_seq_len=131072),
    # meta-llama/Llama-3.1-8B: 8,030,261,248 parameters.
    "llama_8b": ModelConfig(vocab=128256, embed=4096, mlp=14336, layers=32, heads=32, kv_heads=8,
                            head_dim=128, rope_theta=500_000.0,
                            rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), norm_eps=1e-5,
                            tie_embeddings=False, max_seq_len=131072),
    # The ~1.1B shape of the throughput target (TinyLlama-like, untied, vocab 32000).
    "llama_1p1b": ModelConfig(vocab=32000, embed=2048, mlp=5632, layers=22, heads=32, kv_heads=4,
                              head_dim=64, rope_theta=10_000.0, tie_embeddings=False,
                              max_seq_len=2048),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name with field overrides (e.g. ``get_preset('tiny', vocab=300)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
