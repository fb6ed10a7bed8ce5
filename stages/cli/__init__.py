"""The command line's own room: the `cca-pipe` dispatcher (main.py), the settings files and released recipes
(params.py, presets.py), the torchrun launch (launch.py), the DVC-stage helpers (dvcstage.py), the code-deps
generator (dvcdeps.py: `python -m stages.cli.dvcdeps [--check]`) and the little the stages share (common.py,
loading.py). The stages themselves are the modules beside this folder, one per verb.
"""

import importlib


def run() -> None:
    """The dispatcher's `run` (`cca-pipe` with sys.argv, ending in SystemExit)."""
    # Loaded by name on call, as main.py reaches the verbs (`verb`): every stage imports this package (its params),
    # so an import statement here would run the dispatcher in every stage's import and, in the imports that
    # pipeline/codefiles.py follows, make each stage's DVC deps all the library code the commands use (the memory
    # planner, the report's formatting). main.py is a dep of the stages that run through it all the same
    # (stages/cli/dvcdeps.py adds it); tokenize and reflogp stay free of the plumbing (docs/safety.md).
    importlib.import_module(f"{__name__}.main").run()


def run_process() -> None:
    """Console-script entry (`cca-pipe = "stages.cli:run_process"`, pyproject.toml): the dispatcher's `run_process`,
    which ends the process when the command ends."""
    importlib.import_module(f"{__name__}.main").run_process()
