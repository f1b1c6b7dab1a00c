"""The import layers the README draws: no module imports a higher layer.

    0 data/ models/ mesh checkpoint atomic runtime eval/qa,matrix,report,select,cycle_report
    1 sampling train/ eval/probes                                  (forward passes, updates)
    2 grow/ distill/ rl/ dream/                                    (the method's parts)
    3 sleep sleep_rows sleep_eval cycle plan/                      (pipeline, cycles, plans)
    4 config cli demo demo_run demo_dream launch_cli cycle_cli cycle_demo */cli.py  (commands)

A new module must be placed here; distill/ never imports the concrete decoder (it reads the
model protocol's capabilities instead).
"""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sleep_jax")

LAYERS = {
    0: ("sleep_jax", "sleep_jax.atomic", "sleep_jax.mesh", "sleep_jax.checkpoint",
        "sleep_jax.runtime", "sleep_jax.data", "sleep_jax.models", "sleep_jax.eval",
        "sleep_jax.eval.qa", "sleep_jax.eval.matrix", "sleep_jax.eval.report",
        "sleep_jax.eval.cycle_report"),
    1: ("sleep_jax.sampling", "sleep_jax.train", "sleep_jax.eval.probes"),
    2: ("sleep_jax.grow", "sleep_jax.distill", "sleep_jax.rl", "sleep_jax.dream",
        "sleep_jax.dream.generator", "sleep_jax.dream.noise", "sleep_jax.dream.rehearse"),
    3: ("sleep_jax.sleep", "sleep_jax.sleep_rows", "sleep_jax.sleep_eval", "sleep_jax.cycle",
        "sleep_jax.plan"),
    4: ("sleep_jax.config", "sleep_jax.cli", "sleep_jax.demo", "sleep_jax.demo_run",
        "sleep_jax.launch_cli", "sleep_jax.cycle_cli", "sleep_jax.cycle_demo",
        "sleep_jax.demo_dream"),
}


def layer_of(module: str) -> int:
    """The layer of ``module``: its longest listed prefix; any ``*.cli`` module is a command."""
    if module.endswith(".cli"):
        return 4
    best, layer = "", None
    for n, names in LAYERS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, layer = name, n
    if layer is None:
        raise KeyError(module)
    return layer


def modules() -> dict[str, set[str]]:
    """{module: the sleep_jax modules it imports} from the source (ast, nothing imported)."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            mod = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if node.module.startswith("sleep_jax"):
                        deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.startswith("sleep_jax")}
            out[mod] = deps
    return out


def test_layer_map_knows_every_module():
    unknown = []
    for mod in modules():
        try:
            layer_of(mod)
        except KeyError:
            unknown.append(mod)
    assert not unknown, f"place these modules in a layer (tests/test_layers.py): {unknown}"


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in sorted(modules().items()) for d in sorted(deps)
           if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_distill_does_not_import_the_decoder():
    bad = [f"{m} imports {d}" for m, deps in modules().items() if m.startswith("sleep_jax.distill")
           for d in deps if d.startswith("sleep_jax.models.llama")]
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_violation():
    # The check itself can fail: a layer-0 module importing the sleep pipeline is flagged.
    assert layer_of("sleep_jax.sleep") > layer_of("sleep_jax.models.llama")
    assert layer_of("sleep_jax.grow.cli") == 4 and layer_of("sleep_jax.train.loop") == 1
    with pytest.raises(KeyError):
        layer_of("sleep_jax_other.x")
