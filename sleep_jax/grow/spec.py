"""What a growth is: the target config (source + overrides, validated) and the operator options.

A growth target is the source ``ModelConfig`` with some sizes raised: ``layers``, ``embed``,
``mlp``, ``heads``, ``kv_heads``, ``expert_slots``. ``head_dim`` and ``vocab`` never change
(RoPE frequencies and the attention scale depend on ``head_dim``; the tokenizer fixes ``vocab``),
no size shrinks, and every other field is refused. ``norm_eps`` is derived by the width
operator and stored in the grown config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from sleep_jax.models.config import ModelConfig

GROWABLE = ("layers", "embed", "mlp", "heads", "kv_heads", "expert_slots")
FIXED = {"head_dim": "RoPE frequencies and the attention scale depend on it",
         "vocab": "the tokenizer fixes it"}


@dataclasses.dataclass(frozen=True)
class GrowOptions:
    """How each operator grows (frozen, hashable: part of the jit cache key).

    Attributes:
      width: "replicate" (HyperCloning: D' = n*D, exact copies) or "zero" (zero-pad, any D').
      heads: "split" (copies inside their own kv group, outgoing rows divided) or "zero"
        (new heads: random q/k/v, zero o).
      mlp: "split" (Net2Net: copy units, divide outgoing rows) or "zero" (random in, zero out).
      depth: "identity" (new layers start as the identity) or "stack" (G_stack baseline: copies
        of the existing layers; NOT function preserving).
      insert_at: for depth "identity": source positions p in [0, L] where a new layer goes
        before source layer p (p = L appends); None spreads them evenly.
      noise: std of the zero-sum symmetry-breaking noise added to the weights that read
        identical copies, relative to that weight array's std (0 keeps clones identical).
      init_std: std of random new weights when the source array offers no scale (all zero or
        absent); otherwise new random weights use the source array's std.
    """

    width: str = "replicate"
    heads: str = "split"
    mlp: str = "split"
    depth: str = "identity"
    insert_at: tuple[int, ...] | None = None
    noise: float = 0.01
    init_std: float = 0.02

    def __post_init__(self):
        allowed = {"width": ("replicate", "zero"), "heads": ("split", "zero"),
                   "mlp": ("split", "zero"), "depth": ("identity", "stack")}
        for name, ok in allowed.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"GrowOptions.{name}={getattr(self, name)!r}; allowed: "
                                 f"{', '.join(ok)}")
        if self.noise < 0 or self.init_std <= 0:
            raise ValueError(f"GrowOptions.noise={self.noise} must be >= 0 and "
                             f"init_std={self.init_std} > 0")
        if self.insert_at is not None:
            object.__setattr__(self, "insert_at", tuple(int(p) for p in self.insert_at))


def parse_overrides(text: str) -> dict[str, int]:
    """``"layers=60,embed=1152"`` -> {"layers": 60, "embed": 1152} (values are integers)."""
    out: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"growth override {part!r} in {text!r} must look like KEY=VALUE, "
                             f"e.g. 'layers=60,embed=1152'; keys: {', '.join(GROWABLE)}")
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"growth override {key}={value!r}: the value must be an "
                             f"integer") from None
    return out


def check_growth(src: ModelConfig, dst: ModelConfig) -> None:
    """Raise ValueError naming the field if ``dst`` is not a valid growth of ``src``."""
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(src, f.name), getattr(dst, f.name)
        if a == b or f.name == "norm_eps":  # eps is derived by the width operator
            continue
        if f.name == "expert_rank" and src.expert_slots == 0:
            continue  # no expert arrays exist yet: the first slots may take any rank
        if f.name == "expert_router":
            if a or src.expert_slots:
                raise ValueError(
                    f"growth cannot change expert_router ({a} -> {b}) on a model with "
                    f"{src.expert_slots} expert slot(s): a sigmoid gate cannot reproduce the "
                    "ungated slots (gate 1) nor be removed exactly; add the router together "
                    "with the first slots (expert_slots 0 -> E)")
            continue
        if f.name in FIXED:
            raise ValueError(f"growth cannot change {f.name} ({a} -> {b}): {FIXED[f.name]}")
        if f.name not in GROWABLE:
            raise ValueError(f"growth cannot change {f.name} ({a!r} -> {b!r}); growable "
                             f"fields: {', '.join(GROWABLE)}")
        if b < a:
            raise ValueError(f"growth cannot shrink {f.name} ({a} -> {b}); sizes only grow")
    g, g2 = src.groups, dst.groups
    if dst.heads != src.heads or dst.kv_heads != src.kv_heads:
        if g2 < g:
            raise ValueError(f"growth of heads {src.heads}/{src.kv_heads} -> "
                             f"{dst.heads}/{dst.kv_heads} lowers the query heads per kv head "
                             f"({g} -> {g2}); it must stay >= {g}")


def target_config(src: ModelConfig, overrides: Mapping[str, int] | str) -> ModelConfig:
    """The source config with ``overrides`` applied and checked (``norm_eps`` not yet derived).

    Raises:
      ValueError naming the field for an unknown key, a fixed field (head_dim, vocab), a size
      that shrinks, or a field that growth does not change.
    """
    if isinstance(overrides, str):
        overrides = parse_overrides(overrides)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown growth field {key!r}; growable: {', '.join(GROWABLE)}")
    dst = src.replace(**dict(overrides)) if overrides else src
    check_growth(src, dst)
    return dst
