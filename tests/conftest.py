from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_pipeline import build_pipeline_from, build_upstream, built_once
from worlds import save_random_inception
from zygote import FRESH_ENV, zygote_on_path

from pipeline.models.llamagen import GPT, GPTConfig

TINY_GPT = dict(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=16, multiple_of=16)


@pytest.fixture
def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY_GPT)).eval()


# `make test-fast` (pytest -m "not slow") runs the unit tests only. Slow: what starts processes (the CLI as a
# subprocess, torchrun, DVC) or runs a pipeline end to end. Marked here, in one place, by module (every test
# in it) or by test name, rather than by a decorator in each file.
SLOW_MODULES = {
    "test_distributed", "test_fsdp",  # torchrun, 2 processes
    "test_dvc_smoke", "test_ddo_pipeline", "test_imagenet_pipeline", "test_var_pipeline", "test_shipped_pipelines",
    "test_hub_pipelines",  # dvc repro
    "test_resume", "test_tokenize_resume", "test_hostile_inputs", "test_negatives_processes",  # the CLI in subprocesses, killed and rerun
    "test_demo_seeds",  # dvc repro of the tiny pipeline, once per seed (bench/demo_seeds.py)
    "test_lambda_experiment",  # dvc exp run on the tiny pipeline
    "test_process_end", "test_zygote",  # cca-pipe processes, a zygote
}
SLOW_TESTS = {
    "test_tiny_golden.py::test_tiny_pipeline_matches_the_recorded_values",  # reflogp, train and eval end to end
    "test_staleness.py::test_editing_messages_and_help_leaves_the_cache_and_tokens_valid",  # dvc repro, cca-pipe train
    "test_report.py::test_sweep_expands_into_named_stages",  # dvc stage list
    "test_dvc_deps.py::test_dvc_parses_every_pipeline",  # dvc, once per pipeline
    "test_live.py::test_a_killed_and_resumed_train_leaves_one_step_axis",  # the CLI killed and rerun
    "test_live.py::test_dvc_plots_show_and_exp_show_read_the_live_files",  # git and dvc in a tiny repo
    "test_select.py::test_best_keeps_the_lowest_fid_checkpoint_as_eval_scores_it",  # 6 evals (select's 3, its check's 3)
    # tokenize, reflogp and train through the CLI (in process)
    *(f"test_reference_noise.py::{name}" for name in (
        "test_the_cache_records_its_dropout", "test_a_clean_cache_with_dropout_passes_the_step0_check",
        "test_a_self_contradicting_cache_stops_train_naming_cache_column_and_rows",
        "test_train_refuses_a_cache_of_other_dropout_unless_told", "test_train_prints_its_step_count_and_max_steps_caps_it",
        "test_train_records_its_settings_spelled_as_params_yaml")),
    "test_plan.py::test_tokenize_and_eval_plans_match_measured_peaks_on_cpu",  # a process measuring 4 models, InceptionV3
    "test_plan.py::test_plan_matches_measured_peak_on_cpu",  # a process per training step measured (bench/memory.py)
    "test_plan.py::test_process_terms_are_what_this_machines_processes_hold",  # 4 fresh Python processes
    "test_plan.py::test_cca_pipe_puts_large_tensors_on_huge_pages_unless_told_not_to",  # a fresh Python process
    *(f"test_integrity.py::{name}" for name in (  # tokenize, reflogp and train through the CLI (in process)
        "test_train_refuses_a_cache_with_one_row_swapped", "test_train_keeps_a_policy_the_user_put_in_place_of_ours",
        "test_tokenize_sees_a_cp_p_rewrite_and_rehash_rereads_everything")),
}


# The stages at the ImageNet shapes (13 GB of RSS, ~20-35 min on this 2-core machine): `make test-shapes` runs
# them (pytest --real-shapes); `make test` would pass the CI's 90 minutes with them, so it skips them, saying so.
REAL_SHAPE_TESTS = {"test_plan.py::test_plan_matches_the_stages_at_the_imagenet_shapes"}


def pytest_addoption(parser) -> None:
    parser.addoption("--real-shapes", action="store_true",
                     help="run the tests of the stages at the ImageNet shapes (make test-shapes)")


# `make test` runs the suite in 2 pytest-xdist workers. A module with a module-scoped fixture (a `dvc repro`, a
# torchrun world, a trained model) runs in one worker, so that the fixture is built once; the tests of the other
# modules, and of SPREAD (cheap fixtures, costly tests: both workers build the fixture), are dealt out one by one.
# The costliest modules come first (--no-loadscope-reorder keeps this order), so that the other worker does the rest
# meanwhile: test_dvc_smoke is one chain (the main pipeline, then pipelines/paper on its outputs). It builds the
# session's tiny pipeline (tiny_upstream, tiny_pipeline) that test_ddo_pipeline and test_demo_seeds copy: they come
# after test_shipped_pipelines, by when it is built, so that the other worker does not wait for it. The CPU seconds
# of the modules: docs/performance.md.
SPREAD = {"test_shipped_pipelines", "test_imagenet_pipeline", "test_var_pipeline", "test_hub_pipelines"}
COSTLY_FIRST = (
    "test_dvc_smoke", "test_shipped_pipelines", "test_ddo_pipeline", "test_demo_seeds", "test_lambda_experiment",
    "test_hub_pipelines",
    "test_distributed", "test_hostile_inputs", "test_imagenet_pipeline",
    "test_var_pipeline", "test_fsdp", "test_integrity", "test_tiny_golden", "test_resume", "test_tokenize_resume",
    "test_reference_noise", "test_plan",
)


def shares_a_fixture(path: Path) -> bool:
    if path.stem in SPREAD:
        return False
    text = path.read_text(encoding="utf-8")
    return 'scope="module"' in text or 'scope="session"' in text


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist (pytest alone), never called
def pytest_xdist_make_scheduler(config, log):
    """loadscope's scheduler with the work units above: a module that shares a fixture, else a test. (Not
    --dist loadgroup's xdist_group marks: pytest-xdist 3.8 writes the group into item._nodeid, which pytest 9.2
    no longer reads, so they group nothing.)"""
    from xdist.scheduler import LoadScopeScheduling

    grouped = functools.cache(lambda path: shares_a_fixture(config.rootpath / path))

    class ModuleOrTest(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if grouped(path) else nodeid

        def _reschedule(self, node) -> None:
            # the next unit once a worker is on its last test; xdist's own rule (on its last 2) would queue a unit, say
            # the hostile inputs, behind test_dvc_smoke's paper pipeline while the other worker ran out of work
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return ModuleOrTest(config, log)


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # 2 workers on 2 cores: one thread each, and for the processes the tests start
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def own_caches(tmp_path_factory):
    """eval's default fidelity cache ($XDG_CACHE_HOME/cca-pipe/fidelity) in this session's (this worker's) own
    folder: the tests neither read nor fill the user's cache, and two workers never share one. DVC sends no
    usage report: each would be one more `dvc daemon analytics` process per dvc command the tests run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        patch.setenv("DVC_NO_ANALYTICS", "1")
        # matplotlib keeps its font list there too: built now, once, so that no process a test starts prints
        # "Matplotlib is building the font cache" into the output the test reads
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], check=True, capture_output=True)
        yield


@pytest.fixture(scope="session", autouse=True)
def forked_stage_processes(own_caches, tmp_path_factory, request):
    """The venv's bin first on PATH for the processes the tests start (`dvc`, `cca-pipe`), and before it, unless
    CCA_PIPE_TEST_FRESH=1, the client of this session's zygote (tests/zygote.py): the `cca-pipe` stages that DVC
    runs are forked from a process that has imported torch, instead of each importing it (2-4 s of CPU each). Only
    where the session runs a slow test (those start the processes): `make test-fast` does without."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", path)
        if os.environ.get(FRESH_ENV) == "1" or not any(item.get_closest_marker("slow") for item in request.session.items):
            yield
            return
        with zygote_on_path(tmp_path_factory.mktemp("zygote")) as env:
            for key, value in env.items():
                patch.setenv(key, value)
            yield


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 weights, random (worlds.py save_random_inception: 35 s of a loaded core, once
    per session instead of once per module); read it, or copy it into a world that may change it."""
    folder = built_once(tmp_path_factory, "random_inception", lambda folder: save_random_inception(folder / "inception.pth"))
    return folder / "inception.pth"


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    """The embedded default at tiny settings run up to its pretrained models, built once per session
    (tests/tiny_pipeline.py); read it, or copy it (`copy_of`) to run anything in it."""
    return built_once(tmp_path_factory, "tiny_upstream", build_upstream)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_upstream) -> Path:
    """The whole embedded default at tiny settings, `dvc repro` done (repro.log: every stage's log), built once per
    session from tiny_upstream; read it, or copy it to run anything in it."""
    return built_once(tmp_path_factory, "tiny_pipeline", build_pipeline_from(tiny_upstream))


def pytest_collection_modifyitems(config, items) -> None:
    rank = {module: i for i, module in enumerate(COSTLY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept
    real_shapes = pytest.mark.skip(reason="the stages at the ImageNet shapes: run them with `make test-shapes`")
    for item in items:
        module = item.path.stem
        name = f"{item.path.name}::{item.originalname}"
        if module in SLOW_MODULES or name in SLOW_TESTS or name in REAL_SHAPE_TESTS:
            item.add_marker(pytest.mark.slow)
        if name in REAL_SHAPE_TESTS and not config.getoption("--real-shapes"):
            item.add_marker(real_shapes)
