"""Strict params: unknown keys and wrong types refused with the valid keys listed; the library never
imports the stages, prints, or configures logging."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stages import eval as eval_stage
from stages import tokenize, train
from stages.cli.params import ParamsError, as_params, build, load_params, settings_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ParamsError, match=r"\[train\]: unknown keys \['lamda'\]; valid keys: .*'lambda'"):
        build(train.TrainConfig, {"train": {"lamda": 3}}, "train")


@pytest.mark.parametrize("value", ["0.1", [1], True])
def test_wrong_types_name_the_key(value):
    with pytest.raises(ParamsError, match=r"\[train\]\.beta: expected float"):
        build(train.TrainConfig, {"train": {"beta": value}}, "train")


def test_int_for_float_and_lambda_alias():
    cfg = build(train.TrainConfig, {"train": {"beta": 1, "lambda": 30}}, "train")
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float) and cfg.lam == 30.0
    with pytest.raises(ParamsError, match="expected int"):
        build(train.TrainConfig, {"train": {"batch_size": 64.0}}, "train")
    with pytest.raises(ParamsError, match="expected int"):
        build(train.TrainConfig, {"train": {"seed": False}}, "train")


def test_overrides_parse_as_yaml(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  lambda: 10\n")
    params = load_params(tmp_path / "p.yaml", ["train.lambda=30", "eval.seeds=[0, 1]"])
    assert params["train"]["lambda"] == 30 and params["eval"]["seeds"] == [0, 1]
    with pytest.raises(ParamsError, match="section.key=value"):
        load_params(tmp_path / "p.yaml", ["train.lambda"])


def test_launch_settings_take_set_and_then_the_command_line(tmp_path):
    """params.yaml's launch section <- `--set launch.*` <- --nproc-per-node: the order of every other section
    (a `--set launch.nproc_per_node=1` that was ignored ran a job on 2 processes)."""
    from types import SimpleNamespace

    from stages.cli.main import _launch_config

    params = tmp_path / "params.yaml"
    params.write_text("launch:\n  nproc_per_node: 2\n  nnodes: 1\n  rdzv_endpoint: ''\n")

    def launch(overrides, **flags):
        ctx = SimpleNamespace(obj={"params": params, "overrides": overrides})
        return _launch_config(ctx, flags.get("nproc"), None, None)

    assert launch([]).nproc_per_node == 2
    assert launch(["launch.nproc_per_node=1"]).nproc_per_node == 1
    assert launch(["launch.nproc_per_node=1"], nproc=4).nproc_per_node == 4
    with pytest.raises(ParamsError, match="nproc_per_node"):
        launch(["launch.nproc_per_node=0"])


# every pipeline folder whose stages run `cca-pipe <stage>` with its own params.yaml (pipelines/paper runs the
# embedded default's; its `paper` section is checked below)
PIPELINE_PARAMS = ("params.yaml", "pipelines/imagenet-llamagen/params.yaml", "pipelines/imagenet-var/params.yaml",
                   "pipelines/ddo/params.yaml", "pipelines/imagenet-llamagen/ddo/params.yaml",
                   "pipelines/imagenet-var/ddo/params.yaml")


def _resolved(params: Path, stage: str, profile: str):
    """`cca-pipe --params PARAMS --set profile=PROFILE <stage>`'s settings (stages/cli/main.py resolved_config)."""
    from types import SimpleNamespace

    from stages.cli.main import resolved_config

    ctx = SimpleNamespace(obj={"params": params, "overrides": [f"profile={profile}"], "preset": None})
    return resolved_config(ctx, stage)


@pytest.mark.parametrize("profile", ["full", "trial"])
@pytest.mark.parametrize("params", PIPELINE_PARAMS)
def test_every_pipelines_params_resolve_every_stage_the_cli_registers(params: str, profile: str):
    """The stages are the CLI's registry (stages/cli/main.py STAGES), not a list kept here: a stage added to the CLI
    (import-codes, report's sweep) is resolved from every pipeline's params.yaml, preset and profile included."""
    from stages.cli.main import STAGES

    for stage, (_module, cls_name, _section) in STAGES.items():
        assert type(_resolved(ROOT / params, stage, profile)).__name__ == cls_name, (params, stage)


def test_every_params_section_is_read_by_a_stage_the_cli_registers():
    """A section no registered stage reads would be checked by nothing: every mapping of every pipeline's
    params.yaml is a CLI stage's section (or the launcher's); import_codes and sweep are among them, and VAR's
    pipeline resolves to VAR's released recipe (stages/cli/presets.py var-d16: lr 2e-5, schedule lin0)."""
    from stages.cli.main import STAGES

    sections = {section for _module, _cls, section in STAGES.values()}
    assert {"import_codes", "sweep"} <= sections
    for params in PIPELINE_PARAMS:
        read = load_params(ROOT / params)
        assert {k for k, v in read.items() if isinstance(v, dict)} - sections - {"launch"} == set(), params
    var_train = _resolved(ROOT / "pipelines/imagenet-var/params.yaml", "train", "full")
    assert (var_train.lr, var_train.lr_schedule) == (2e-5, "lin0")


def test_params_yaml_agrees_with_the_config_defaults():
    """One source of defaults: the stage configs; params.yaml lists every key with the same value."""
    import dataclasses
    import importlib

    from pipeline.config import key_of
    from stages.cli.main import STAGES
    from stages.cli.params import as_params

    params = load_params(ROOT / "params.yaml")
    for module, cls_name, section in [*STAGES.values(), ("cli.launch", "LaunchConfig", "launch")]:
        cls = getattr(importlib.import_module(f"stages.{module}"), cls_name)
        assert set(params[section]) == {key_of(f) for f in dataclasses.fields(cls)}, section
        assert as_params(build(cls, params, section)) == as_params(cls()), section


def test_resolved_settings_print_like_params_yaml():
    """`cca-pipe config` and settings.yaml: a key per line (a section of scalars is not squeezed onto one flow line),
    lists on one line, and the text reads back as the same settings."""
    import yaml

    cfg = eval_stage.EvalConfig(cfg_scales=[0.5, 1.0])
    text = settings_yaml({"tokenize": tokenize.TokenizeConfig(), "eval": cfg}, preset="llamagen-B")
    lines = text.splitlines()
    assert lines[:3] == ["preset: llamagen-B", "tokenize:", f"  image_size: {tokenize.TokenizeConfig().image_size}"]
    assert "  cfg_scales: [0.5, 1.0]" in lines and "{" not in text
    assert yaml.safe_load(text) == {"preset": "llamagen-B", "tokenize": as_params(tokenize.TokenizeConfig()),
                                    "eval": as_params(cfg)}


def test_sweep_and_paper_sections_are_configs_like_the_stages():
    """`sweep` and `paper` are read strictly as the stages' sections are: their files agree with the defaults,
    unknown keys and values out of range are refused naming the key."""
    from stages.cli.params import as_params
    from stages.paper import PaperConfig
    from stages.report import SweepConfig

    paper = load_params(ROOT / "pipelines/paper/params.yaml")
    assert as_params(build(PaperConfig, paper, "paper")) == as_params(PaperConfig())
    assert set(paper["paper"]) == set(as_params(PaperConfig()))
    with pytest.raises(ParamsError, match=r"\[sweep\]: unknown keys \['lambda'\]"):
        build(SweepConfig, {"sweep": {"lambda": [1]}}, "sweep")
    with pytest.raises(ParamsError, match=r"sweep.betas = \[0\]: must be > 0"):
        build(SweepConfig, {"sweep": {"betas": [0]}}, "sweep")
    with pytest.raises(ParamsError, match=r"paper.dpo_betas = \[0.1, -1\]: must be > 0"):
        build(PaperConfig, {"paper": {"dpo_betas": [0.1, -1]}}, "paper")
    # numbers keep their written type: DVC names the matrix stages' folders with the value as written
    assert [str(x) for x in build(SweepConfig, {"sweep": {"lambdas": [1, 2.5, 3.0]}}, "sweep").lambdas] == ["1", "2.5", "3.0"]


def test_library_never_imports_stages_nor_prints():
    for path in (ROOT / "pipeline").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "stages" for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "stages", path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"print() in {path}:{node.lineno}"
            if isinstance(node, ast.Attribute) and node.attr == "basicConfig":
                pytest.fail(f"logging configured in library module {path}")


def _module_graph(package: str) -> dict[str, set[str]]:
    from pipeline.codefiles import _module_name, imports_of

    files = sorted((ROOT / package).rglob("*.py"))
    names = {_module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in names and m != name} for name, path in names.items()}


def test_no_import_cycle_among_library_modules():
    """Imports anywhere in a module (inside functions too) form no cycle in pipeline/."""
    graph = _module_graph("pipeline")
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                            else f"import cycle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_family_dispatch_in_stages():
    """Stages never ask which model family they hold: no isinstance on model or tokenizer classes, no test
    of a preset's name (the family objects and stages/cli/presets.py own those differences)."""
    import pipeline.models.llamagen as llamagen
    import pipeline.models.var as var
    import pipeline.tokenizers.msvq as msvq
    import pipeline.tokenizers.vq as vq
    from stages.cli.presets import PRESETS

    classes = {name for module in (llamagen, var, msvq, vq) for name, obj in vars(module).items() if isinstance(obj, type)}
    for path in (ROOT / "stages").rglob("*.py"):  # the stages and their CLI room
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | \
                        {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                assert not named & classes, f"{path.name}:{node.lineno} dispatches on {named & classes}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and path.name != "presets.py":
                assert node.value not in PRESETS and node.value != "var-d", f"{path.name}:{node.lineno} tests preset name {node.value!r}"


def family_name_tests(root: Path, names: set[str], allowed: set[str]) -> list[str]:
    """Every comparison with a family's name as a string literal (`family == "var"`, `kind in ("var", ...)`,
    a `case "var":`) in pipeline/ and stages/ under `root`, outside the files in `allowed` (relative paths)."""
    def literal(node) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(literal(e) for e in node.elts)
        return isinstance(node, ast.Constant) and node.value in names

    found = []
    for path in sorted([*(root / "pipeline").rglob("*.py"), *(root / "stages").rglob("*.py")]):
        if str(path.relative_to(root)) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(literal(n) for n in (node.left, *node.comparators)) \
                    or isinstance(node, ast.MatchValue) and literal(node.value):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_family_name_tests_outside_the_family_module():
    """Every family-dependent decision is the family object's (pipeline/families.py): no code elsewhere tests
    a registered family's name; a family's own model module (its `model_module`) may speak of itself, and so may
    the converters from the peers' checkpoint layouts (pipeline/loaders.py: a VAR file says its kind is "var")."""
    from pipeline.codefiles import module_file
    from pipeline.families import families

    known = families()
    allowed = {"pipeline/families.py", "pipeline/loaders.py"} | {str(module_file(f.model_module).relative_to(ROOT)) for f in known.values()}
    assert {"llamagen", "var"} <= set(known)
    assert family_name_tests(ROOT, set(known), allowed) == []


def test_the_family_name_scan_finds_name_tests(tmp_path):
    """The scan above catches each form of a name test, and leaves other strings and the allowed files alone."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text(
        'if family == "var":\n    pass\nif kind in ("llamagen", "x"):\n    pass\nok = name == "varx"\n'
        'match f:\n    case "var":\n        pass\n')
    (tmp_path / "stages" / "b.py").write_text('x = "llamagen" != family.name\ny = {"var": 1}["var"]\n')
    (tmp_path / "pipeline" / "families.py").write_text('if name == "var":\n    pass\n')
    found = family_name_tests(tmp_path, {"llamagen", "var"}, {"pipeline/families.py"})
    assert found == ["pipeline/a.py:1", "pipeline/a.py:3", "pipeline/a.py:7", "stages/b.py:1"]
