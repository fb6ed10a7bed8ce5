"""Rewrite the code deps of every stage in the project's dvc.yaml files from the imports (what
tests/test_dvc_deps.py checks), and the train params of a stage that lists them one by one from TrainConfig's
fields (tests/test_train_config.py): `python tests/update_dvc_deps.py`. Data deps and comments are kept."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).parent))
from test_dvc_deps import DVC_FILES, required_files, stage_command  # noqa: E402
from test_train_config import lists_train_params, tracked_train_params  # noqa: E402

from pipeline.codefiles import PACKAGES, ROOT  # noqa: E402


def is_code(dep: str, base: Path) -> bool:
    path = Path(os.path.normpath(base / dep))
    return "${" not in dep and path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES


def main() -> None:
    yaml = YAML()
    yaml.width = 200
    yaml.indent(mapping=2, sequence=4, offset=2)
    for dvc_file in DVC_FILES:
        doc = yaml.load(dvc_file.read_text())
        for stage in doc["stages"].values():
            stage = stage.get("do", stage)  # a foreach stage's body
            deps = stage.setdefault("deps", [])
            data = [d for d in deps if not is_code(str(d), dvc_file.parent)]
            code = [os.path.relpath(p, dvc_file.parent) for p in required_files(stage_command(stage["cmd"]))]
            deps.clear()
            deps.extend(data + code)
            if lists_train_params(stage):
                params = stage["params"]
                others = [p for p in params if not (isinstance(p, str) and p.startswith("train."))]
                params.clear()
                params.extend(others + tracked_train_params(stage))
        with open(dvc_file, "w") as f:
            yaml.dump(doc, f)
        print(f"updated {dvc_file.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
