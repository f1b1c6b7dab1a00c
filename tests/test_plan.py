"""Mesh plans: the HLO reader on hand-written HLO, and a real plan on v5e:2x4 (8 chips).

The plan test compiles for TPU through libtpu (the ``plan`` extra); without it those tests skip.
"""

import json
import os

import pytest

from sleep_jax.plan import chips, hlo

HLO = """
ENTRY %main {
  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %p), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-gather.2 = bf16[8,64]{1,0:T(8,128)(2,1)} all-gather(%p1), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([8]) {'axis_0'}, dimensions={0}
  %all-gather.3 = bf16[8,64]{1,0} all-gather(%p2), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([8]) {'axis_0'}, dimensions={0}
  %reduce-scatter.4 = f32[16,4]{1,0} reduce-scatter(%p3), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %collective-permute-start.5 = (f32[32]{0}, f32[32]{0}, u32[], u32[]) collective-permute-start(%p4), channel_id=4, source_target_pairs={{0,1}}
  %collective-permute-done.6 = f32[32]{0} collective-permute-done(%collective-permute-start.5)
  %all-to-all.7 = s32[2,2]{1,0} all-to-all(%p5), channel_id=5, replica_groups={{0,1}}, dimensions={0}
  %while.8 = (s32[], f32[4]) while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"10"}}
  %while.9 = (s32[], f32[4]) while(%t2), condition=%c2, body=%b2
}
"""  # noqa: E501 (HLO lines as XLA writes them)


def test_hlo_collectives_and_loops_by_hand():
    c = hlo.collectives(HLO)
    assert c["all-reduce"] == {"count": 1, "bytes": 1024 * 4}
    # the same channel written twice (async start/done fusions) counts once
    assert c["all-gather"] == {"count": 1, "bytes": 8 * 64 * 2}
    # reduce-scatter: the full operand = result x group size (iota groups [2,4]: 4 per group)
    assert c["reduce-scatter"] == {"count": 1, "bytes": 16 * 4 * 4 * 4}
    assert c["collective-permute"] == {"count": 1, "bytes": 32 * 4}  # done not counted again
    assert c["all-to-all"] == {"count": 1, "bytes": 2 * 2 * 4}
    assert hlo.while_loops(HLO) == [10, None]
    assert hlo.group_size("replica_groups={{0,1,2}}") == 3
    assert hlo.group_size("x replica_groups=mesh['a'=4,'b'=2], d {'a','b'}") == 8


def test_roofline_and_chips():
    v5e = chips.chip_of("v5e:16x16")
    assert (v5e.peak_flops, v5e.hbm_bw, v5e.ici_bw) == (197e12, 819e9, 400e9)
    t = chips.roofline(197e12, 819e9 * 2, 0.0, v5e)  # 1 s of compute, 2 s of HBM traffic
    assert t["compute_s"] == pytest.approx(1.0) and t["step_s"] == pytest.approx(2.0)
    assert t["bound"] == "hbm"
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
        chips.chip_of("v9:2x2")


def test_depth_fit_extrapolates_every_figure_linearly():
    from sleep_jax.plan.run import extrapolate

    def rep(x):  # a report whose figures are all x (a one-layer program) or 2x - 1 ...
        return {"memory": {"argument": x, "temp": 2 * x}, "flops": 10.0 * x,
                "bytes_accessed": x + 1.0, "collectives": {"all-reduce": {"count": x,
                                                                         "bytes": 4.0 * x}},
                "compile_s": 1.0, "loops": [], "tokens": 7}

    out = extrapolate(rep(3), rep(5), layers=32)  # each layer adds 2: x(32) = 3 + 31 * 2 = 65
    assert out["memory"] == {"argument": 65, "temp": 130}
    assert (out["flops"], out["bytes_accessed"]) == (650.0, 66.0)
    assert out["collectives"]["all-reduce"] == {"count": 65, "bytes": 260.0}
    assert out["compile_s"] == 2.0 and out["tokens"] == 7


def test_plan_config_errors():
    from sleep_jax.plan.run import PlanConfig

    with pytest.raises(ValueError, match="only the tiny preset"):
        PlanConfig(measure=True, preset="llama_8b")
    with pytest.raises(ValueError, match="unknown \\['sample'\\]"):
        PlanConfig(steps="train,sample")
    from sleep_jax.plan.cli import main

    assert main(["--config", "configs/plan.py", "--config.target=big"]) == 2


def hand_train_flops(cfg, B, T):
    """3 x the forward matmul FLOPs (2 per multiply-add) of the whole model on [B, T] rows.

    Per token and layer: q (D x N H), k and v (D x K H each), o (N H x D), gate/up/down
    (3 D x F), scores q.k and the weighted sum p.v over all T keys (the einsum reference
    computes the masked full square); then the unembedding (D x V). The embedding is a gather
    (no FLOPs). Backward = 2 x forward for every matmul (input and weight gradients).
    """
    D, F, N, K, H, V, L = (cfg.embed, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.head_dim,
                           cfg.vocab, cfg.layers)
    layer = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 2 * 2 * T * N * H
    return 3 * B * T * (L * layer + 2 * D * V)


def test_mfu_formula_is_the_hand_count_plus_norms_and_the_benchmark_uses_it():
    # 6N + 12LDT per token (PaLM appendix B) against the matmul hand count of a tied model: the
    # same matmuls (the tied embedding is the unembedding's weight, the attention term is
    # 3 x 4 T N H per layer), plus 6 x the RMSNorm weights, which are not matmuls.
    import importlib.util

    from sleep_jax.models.config import flops_per_token, get_preset

    cfg = get_preset("tiny", embed=128, mlp=512, head_dim=32, vocab=512)
    B, T = 8, 64
    norms = cfg.layers * 2 * cfg.embed + cfg.embed
    assert flops_per_token(cfg, T) * B * T == hand_train_flops(cfg, B, T) + 6 * norms * B * T
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "train_throughput.py")
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.flops_per_token is flops_per_token  # one definition


@pytest.fixture(scope="module")
def plan():
    pytest.importorskip("libtpu", reason="the mesh plan compiles for TPU with libtpu: "
                        "pip install -e '.[plan]' (make test installs it)")
    from sleep_jax.plan.run import PlanConfig, run_plan

    cfg = PlanConfig(topology="v5e:2x4", preset="tiny",
                     overrides="embed=128,mlp=512,head_dim=32,vocab=512",
                     meshes="data=2,fsdp=4", teacher_mesh="fsdp=2,tensor=4",
                     steps="train,seeding", grow_to="expert_slots=2,expert_rank=8",
                     seq_len=64, prompt_len=8, new_tokens=2, memory_len=8,
                     dtype="float32", remat="none")
    return run_plan(cfg, log=lambda s: None)


def test_plan_train_flops_equal_a_hand_count(plan):
    from sleep_jax.plan.run import PlanConfig, models

    row = next(r for r in plan["rows"] if r["step"] == "train")
    assert "error" not in row, row
    assert row["loops"] == [], "the layer scan must be unrolled: cost_analysis counts a body once"
    base = models(PlanConfig(preset="tiny", overrides="embed=128,mlp=512,head_dim=32,vocab=512",
                             remat="none"))[0]
    assert base.layers == 2
    want = hand_train_flops(base, plan["shapes"]["batch"], plan["shapes"]["seq_len"])
    got = row["flops"] * plan["chips"]  # per chip x 8: the batch splits over all 8 chips
    # The compiled count adds elementwise work (softmax, norms, SiLU, RoPE, cross-entropy,
    # AdamW on 0.56M parameters), a few percent at these sizes, and never removes a matmul:
    # hand <= compiled <= 1.06 x hand. A scanned (not unrolled) plan would report about half.
    assert want <= got <= 1.06 * want, (got, want, got / want)
    assert row["fits"] and 0 < row["memory"]["total"] < chips.CHIPS["v5e"].hbm_bytes
    assert row["collectives"]["all-gather"]["count"] > 0  # fsdp=4 gathers the weights
    assert plan["best_mesh"] == "data=2,fsdp=4,tensor=1"


def test_plan_seeding_compiles_teacher_and_student_on_two_layouts(plan):
    row = next(r for r in plan["rows"] if r["step"] == "seeding")
    assert "error" not in row, row
    assert plan["teacher_mesh"] == "data=1,fsdp=2,tensor=4"
    assert row["mesh"] == "data=2,fsdp=4,tensor=1"
    assert row["flops"] > 0 and row["memory"]["argument"] > 0
    # the sampler's decode while_loops stay (dynamic trip count: EOS), reported as such
    assert None in row["loops"]
    json.dumps(plan)  # the JSON table
