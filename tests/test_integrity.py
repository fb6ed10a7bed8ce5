"""Issue 29: the four "silent wrong results" (exit 0 on main ad9fd3b), each now a refusal or the right value.

1. YAML 1.1 numbers: `lambda: 010` read as 8 and `1:30` as 90 (params files and `--set`).
2. A cache edited in a few rows after it was written trained (the step-0 check scored the first 64 rows of
   the epoch order only): now a content digest written with the cache is verified on every read, and the
   step-0 check samples rows over the whole cache.
3. tokenize called a store "up to date" after a rewrite that kept size and mtime (`cp -p`): the stat key
   now holds ctime and inode too, and `--rehash` hashes every image.
4. A file listed as ours in `.cca-pipe.json` whose bytes the user replaced was overwritten or deleted: it
   is the user's now (kept, or refused where a run writes).
docs/safety.md ("What is and is not detected") states what these tests measure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from worlds import invoke

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]


# ------------------------------------------------------------------------------------- 1. YAML 1.1 numbers


def test_leading_zeros_and_prefixed_numbers_read_as_yaml_1_2(tmp_path):
    """`010` is 10 (YAML 1.1: octal 8), as DVC's ruamel.yaml reads the same file; 0o10 is octal, 0x10 hex."""
    from stages.params import build, load_params, parse_overrides
    from stages.train import TrainConfig

    (tmp_path / "params.yaml").write_text("train:\n  lambda: 010\n")
    assert build(TrainConfig, load_params(tmp_path / "params.yaml"), "train").lam == 10.0  # ad9fd3b: 8.0
    (tmp_path / "params.yaml").write_text("train:\n  lambda: 010\n  beta: 0o10\n  seed: 0x10\n  lr: 1e-5\n  max_steps: 1_000\n")
    cfg = build(TrainConfig, load_params(tmp_path / "params.yaml"), "train")
    assert (cfg.lam, cfg.beta, cfg.seed, cfg.lr, cfg.max_steps) == (10.0, 8.0, 16, 1e-5, 1000)
    assert build(TrainConfig, {}, "train", overrides=parse_overrides(["train.lambda=010"])).lam == 10.0
    assert parse_overrides(["train.lambda=-010"]) == {"train": {"lambda": -10}}


@pytest.mark.parametrize("how", ["file", "set"])
def test_a_base_60_number_is_refused_in_one_line_naming_the_key(how, tmp_path, monkeypatch, capsys):
    """`lambda: 1:30` was 90.0 (YAML 1.1 base 60); in YAML 1.2 it is the text '1:30', which a number setting
    refuses, naming the file and the key."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if how == "file":
        text = (tmp_path / "params.yaml").read_text()
        (tmp_path / "params.yaml").write_text(text.replace(f"  lambda: {params['train']['lambda']}\n", "  lambda: 1:30\n", 1))
        assert "lambda: 1:30" in (tmp_path / "params.yaml").read_text()
        argv = ["--params", tmp_path / "params.yaml", "config", "train"]
    else:
        argv = ["--params", tmp_path / "params.yaml", "--set", "train.lambda=1:30", "config", "train"]
    code, err = invoke(argv, monkeypatch, capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "params.yaml" in lines[0] and "lambda" in lines[0] and "'1:30'" in lines[0], lines[0]


def test_dvc_yaml_variables_read_numbers_as_params_do(tmp_path):
    """`${image_size}` on a dvc.yaml command line: 10, as DVC (YAML 1.2) substitutes it, not 8."""
    from stages.dvcstage import _variables

    (tmp_path / "params.yaml").write_text("image_size: 010\nwhen: 1:30\n")
    assert _variables(tmp_path, {"vars": ["params.yaml"]}) == {"image_size": 10, "when": "1:30"}


# ------------------------------------------------------------------------------------- 2. the reference cache






















# ------------------------------------------------------------------------------------- 3. tokenize's stat key












# ------------------------------------------------------------------------------------- 4. files listed as ours










# ------------------------------------------------------------------------------------- the cases end to end












