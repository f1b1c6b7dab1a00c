"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE (+ Llama-3 scaling), GQA, SwiGLU.

Layers are stacked: every per-layer parameter has a leading ``layers`` axis and the forward pass
is one ``lax.scan`` over them, so compile time does not grow with depth and depth growth is an
insert along one axis. Every parameter carries logical axis names (metadata ``logical_axes``)
that ``sleep_jax.mesh.RULES`` maps to mesh axes. The block math is written as pure functions
of arrays so growth operators and tests can reason about it directly.

Optional low-rank expert slots sit beside each MLP (the paper's growth, arXiv 2606.03979):
``out = MLP(h) + sum_e gate_e * mask_e * B_e(silu(A_e h))`` with ``A_e: D x R``, ``B_e: R x D``
and ``h`` the MLP's (normalised) input. ``mask`` [L, E] is a non-trainable ``SlotMask``
variable; ``gate`` [B, T, E] is 1, or with ``expert_router`` a learned per-token gate
``sigmoid(h . w_e + b_e)`` (``w`` [L, E, D, 1], ``b`` [L, E, 1]: an expert active only where it
is needed), times an optional ``expert_gate`` call argument. ``return_experts=True`` also
returns the gates and the RMS of the slots' added output per token (what a sparsity cost reads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax.mesh import batch_spec
from sleep_jax.models.config import ModelConfig, RopeScaling

NEG_INF = -1e30  # finite, so a fully masked (padding) query row gives no NaN


class SlotMask(nnx.Variable):
    """Non-trainable state: which expert slots are active (1.0) per layer."""


def _param(rngs, init, shape, axes, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """RoPE inverse frequencies [H/2], with Llama-3 ``rope_scaling`` when given.

    inv_freq_i = theta^(-2i/H). Llama-3 keeps high frequencies (wavelength < L0/high), divides
    low ones (wavelength > L0/low) by ``factor`` and interpolates smoothly between, with L0 the
    original context length.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    L0 = scaling.original_max_position
    low_wl, high_wl = L0 / scaling.low_freq_factor, L0 / scaling.high_freq_factor
    wl = 2 * np.pi / inv
    smooth = (L0 / wl - scaling.low_freq_factor) / (scaling.high_freq_factor
                                                     - scaling.low_freq_factor)
    mid = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = np.where(wl < high_wl, inv, np.where(wl > low_wl, inv / scaling.factor, mid))
    return out.astype(np.float32)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq_h: jax.Array) -> jax.Array:
    """Rotate halves (HF layout): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    ang = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h  # [B,T,H/2]
    sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def attention_mask(q_len: int, kv_len: int, kv_valid_bs: jax.Array, offset=0,
                   q_segment_bt=None, kv_segment_bs=None) -> jax.Array:
    """[B,T,S] boolean: key slot s <= query slot (offset + t), key valid, same segment."""
    q_slot = offset + jnp.arange(q_len)[:, None]
    causal = jnp.arange(kv_len)[None, :] <= q_slot  # [T,S]
    m = causal[None] & kv_valid_bs[:, None, :]
    if q_segment_bt is not None:
        m = m & (q_segment_bt[:, :, None] == kv_segment_bs[:, None, :])
    return m


def attend(q_btkgh, k_bskh, v_bskh, mask_bts, impl: str = "xla"):
    """Grouped-query attention; returns [B,T,K,G,H]. Softmax in fp32."""
    B, T, K, G, H = q_btkgh.shape
    if impl != "xla":
        q = q_btkgh.reshape(B, T, K * G, H)
        out = jax.nn.dot_product_attention(
            q, k_bskh, v_bskh, mask=mask_bts[:, None], implementation=None
            if impl == "auto" else impl)
        return out.reshape(B, T, K, G, H)
    s = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh,
                   preferred_element_type=jnp.float32) * (H ** -0.5)
    s = jnp.where(mask_bts[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v_bskh)


def layer_forward(p: dict, x_btd, positions_bt, mask_bts, inv_freq, cfg: ModelConfig,
                  cache_l=None, cache_index=None, expert_gate=None):
    """One decoder layer on arrays. ``p`` holds this layer's parameters (no layers axis).

    With ``cache_l`` ({"k","v": [B,S,K,H]}) the new keys/values are written at ``cache_index``
    and attention runs over the whole cache. Returns (x [B,T,D], new cache_l or None, experts)
    with experts None without slots, else {"gate": each slot's weight mask * gate [B,T,E],
    "out_rms": RMS over D of the slots' summed contribution [B,T]}.
    """
    dt = jnp.dtype(cfg.dtype)
    B, T, _ = x_btd.shape
    h = rms_norm(x_btd, p["attn_norm"], cfg.norm_eps)
    q = jnp.einsum("btd,dnh->btnh", h, p["q"].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", h, p["k"].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", h, p["v"].astype(dt))
    q = apply_rope(q, positions_bt, inv_freq)
    k = apply_rope(k, positions_bt, inv_freq)
    new_cache = None
    if cache_l is not None:
        k = jax.lax.dynamic_update_slice(cache_l["k"], k.astype(cache_l["k"].dtype),
                                         (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(cache_l["v"], v.astype(cache_l["v"].dtype),
                                         (0, cache_index, 0, 0))
        new_cache = {"k": k, "v": v}
        k, v = k.astype(dt), v.astype(dt)
    q = q.reshape(B, T, cfg.kv_heads, cfg.groups, cfg.head_dim)
    o = attend(q, k, v, mask_bts, cfg.attention).reshape(B, T, cfg.heads, cfg.head_dim)
    x_btd = x_btd + jnp.einsum("btnh,nhd->btd", o, p["o"].astype(dt))
    h = rms_norm(x_btd, p["mlp_norm"], cfg.norm_eps)
    g = jnp.einsum("btd,df->btf", h, p["gate"].astype(dt))
    u = jnp.einsum("btd,df->btf", h, p["up"].astype(dt))
    y = jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, p["down"].astype(dt))
    experts = None
    if "expert_a" in p:
        z = jax.nn.silu(jnp.einsum("btd,edr->bter", h, p["expert_a"].astype(dt)))
        w = jnp.broadcast_to(p["expert_mask"].astype(dt), (B, T, p["expert_mask"].shape[-1]))
        if expert_gate is not None:
            w = w * expert_gate.astype(dt)  # [B,T,E] or [E]
        if "expert_router" in p:
            r = jnp.einsum("btd,edo->bteo", h, p["expert_router"].astype(dt))
            w = w * jax.nn.sigmoid((r + p["expert_router_bias"].astype(dt))[..., 0])
        d = jnp.einsum("bter,erd->btd", z * w[..., None], p["expert_b"].astype(dt))
        y = y + d
        experts = {"gate": w, "out_rms": jnp.sqrt(jnp.mean(jnp.square(d.astype(jnp.float32)),
                                                           -1) + 1e-12)}
    return x_btd + y, new_cache, experts


_REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _constrain_batch(x):
    """Keep activations batch-sharded when a mesh is active (no-op otherwise)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = batch_spec(mesh, x.shape)  # the `batch` rule of sleep_jax.mesh.RULES
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


class Blocks(nnx.Module):
    """The stacked per-layer parameters ([L, ...] arrays)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, F, N, K, H = cfg.layers, cfg.embed, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        w = nnx.initializers.normal(0.02)
        ones = nnx.initializers.ones
        self.attn_norm = _param(rngs, ones, (L, D), ("layers", "embed"), pd)
        self.q = _param(rngs, w, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, w, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, w, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, w, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), pd)
        self.mlp_norm = _param(rngs, ones, (L, D), ("layers", "embed"), pd)
        self.gate = _param(rngs, w, (L, D, F), ("layers", "embed", "mlp"), pd)
        self.up = _param(rngs, w, (L, D, F), ("layers", "embed", "mlp"), pd)
        self.down = _param(rngs, w, (L, F, D), ("layers", "mlp", "embed"), pd)
        if cfg.expert_slots:
            E, R = cfg.expert_slots, cfg.expert_rank
            self.expert_a = _param(rngs, w, (L, E, D, R),
                                   ("layers", "expert", "embed", "expert_rank"), pd)
            self.expert_b = nnx.Param(jnp.zeros((L, E, R, D), pd),
                                      logical_axes=("layers", "expert", "expert_rank", "embed"))
            self.expert_mask = SlotMask(jnp.zeros((L, E), pd), logical_axes=("layers", "expert"))
            if cfg.expert_router:
                self.expert_router = _param(rngs, w, (L, E, D, 1),
                                            ("layers", "expert", "embed", "router"), pd)
                self.expert_router_bias = nnx.Param(
                    jnp.zeros((L, E, 1), pd), logical_axes=("layers", "expert", "router"))


class Decoder(nnx.Module):
    """Llama-family causal LM; implements the sleep_jax model protocol.

    ``model(tokens[B,T], positions[B,T], cache=None, mask=None, segment_ids=None)
    -> (logits[B,T,V], cache)``; ``return_hidden=True`` adds the final hidden states [B,T,D].
    """

    @property
    def capabilities(self) -> frozenset[str]:
        """Hidden states always; expert activity when the model has expert slots."""
        return frozenset({"hidden", "experts"} if self.config.expert_slots else {"hidden"})

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, nnx.initializers.normal(0.02), (cfg.vocab, cfg.embed),
                            ("vocab", "embed"), pd)
        self.blocks = Blocks(cfg, rngs)
        self.final_norm = _param(rngs, nnx.initializers.ones, (cfg.embed,), ("embed",), pd)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, nnx.initializers.normal(0.02), (cfg.embed, cfg.vocab),
                                  ("embed", "vocab"), pd)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Empty KV cache: k, v [L,B,S,K,H], valid [B,S] (slots holding real tokens), index."""
        c = self.config
        dt = jnp.dtype(dtype or c.dtype)
        shape = (c.layers, batch, max_len, c.kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
                "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}

    def __call__(self, tokens, positions, cache=None, mask=None, segment_ids=None, *,
                 return_hidden: bool = False, expert_gate=None, return_experts: bool = False):
        """Forward pass.

        Args:
          tokens: [B,T] int token ids.
          positions: [B,T] int positions (RoPE); reset per packed segment.
          cache: from ``init_cache``; new keys/values are written at ``cache["index"]``.
          mask: [B,T] bool, True on real (non-padding) tokens. Default all True.
          segment_ids: [B,T] int; attention stays within a segment (packing). No cache.
          return_hidden: also return the final hidden states [B,T,D] (after the final norm).
          expert_gate: optional expert-slot gate, broadcastable to [B,T,E] (default 1).
          return_experts: also return the expert slots' activity per layer: {"gate": mask *
            gate [L,B,T,E], "out_rms": RMS of their added output [L,B,T]} (needs slots).
        Returns:
          (logits [B,T,V] fp32, cache), then hidden [B,T,D] if ``return_hidden``, then the
          expert activity if ``return_experts``.
        """
        cfg = self.config
        if return_experts and not cfg.expert_slots:
            raise ValueError("return_experts=True needs a model with expert slots "
                             f"(expert_slots >= 1); got expert_slots={cfg.expert_slots}")
        dt = jnp.dtype(cfg.dtype)
        B, T = tokens.shape
        if mask is None:
            mask = jnp.ones((B, T), bool)
        inv_freq = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        x = _constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(dt))
        params = {k: v[...] for k, v in vars(self.blocks).items()
                  if isinstance(v, nnx.Variable)}
        if cache is None:
            attn_mask = attention_mask(T, T, mask, 0, segment_ids,
                                       segment_ids if segment_ids is not None else None)
            layer_cache, index = None, None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            index = cache["index"]
            S = cache["k"].shape[2]
            valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, index))
            attn_mask = attention_mask(T, S, valid, index)
            layer_cache = {"k": cache["k"], "v": cache["v"]}

        def body(x, xs):
            p, c = xs
            x, c, g = layer_forward(p, x, positions, attn_mask, inv_freq, cfg, c, index,
                                    expert_gate)
            return _constrain_batch(x), (c, g if return_experts else None)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat])
        x, (new_layer_cache, experts) = jax.lax.scan(body, x, (params, layer_cache),
                                                      unroll=bool(cfg.unroll_layers))
        x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dt),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.unembed[...].astype(dt),
                                preferred_element_type=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = dict(new_layer_cache, valid=valid, index=index + T)
        out = (logits, new_cache)
        if return_hidden:
            out += (x,)
        if return_experts:
            out += (experts,)
        return out
