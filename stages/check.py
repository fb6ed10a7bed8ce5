"""`cca-pipe check`: a DVC pipeline's every stage against what is known before its first one runs.

Run in a folder with a dvc.yaml (the shipped pipelines run it as their first stage, `check`, on which the
first expensive stage depends), it reads each `cca-pipe` stage's settings as that stage will run them (the
resolution `cca-pipe config` shows: stages/cli/dvcstage.py applies the stage's command-line options), and checks
them against what is cheap to know now:
  - every input a stage names that no stage makes exists (dvc.yaml's deps: checkpoints, tokenizer, image
    folder, reference batch, Inception weights), naming the params.yaml key it came from;
  - every section's settings build (ranges, multiples, eval's methods and scales: the stages' own checks);
  - the image folder's images and classes (by listing, no decoding), the views tokenize makes of each
    (tokenize.augment), and so the rows an epoch (a visit) of the reference cache will hold (reflogp.views);
  - the tokenizer's token layout at tokenize.image_size, and each generator checkpoint against it (token count,
    VAR depth, classes) from its shapes and stored config, tensors memory-mapped (Family.check_file);
  - train.batch_size against the cache's rows and the micro-batches against the processes
    (pipeline.parallel's checks, which train itself runs on the real cache).
Each problem is one line naming the key and a fix; any problem exits 2 before anything expensive ran.

What it cannot know in advance (docs/imagenet.md, "Before the first stage"): images that fail to decode
(tokenize finds them: tokenize.bad_images), the memory a batch takes on the GPU (`cca-pipe plan`), a named
upstream GPT's resolution (LlamaGen's files carry no block size: image_size must match it by hand), and
inputs of a pipeline that starts from imported codes (rows unknown until import-codes ran).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import click
import yaml

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.formats import FormatError
from pipeline.outputs import OutputError

if TYPE_CHECKING:  # pipeline.families loads the models: imported where a check needs it
    from pipeline.families import FamilyContract

TRIAL_FIX = ", or set `profile: trial` in params.yaml for a trial run on a few images (docs/imagenet.md)"
# a passing check's record: constant, so that a rerun that passes never makes the stages after it stale
RECORD = "cca-pipe check: every stage's settings fit the inputs (stages/check.py)\n"


@dataclass(frozen=True)
class CommandLine:
    """What check takes of the `cca-pipe` command line, handed over by stages/cli/main.py (this module never imports
    cli: no import cycle): its group (a stage's own options parsed as click parses them), the settings resolution
    `config` uses, the active preset, the launch settings and the table of stages."""

    main: click.Group
    resolved_config: Callable
    active_preset: Callable
    launch_config: Callable
    stages: dict


@dataclass
class Known:
    """What the stages checked so far tell the later ones (None: unknown), and the command line it reads them by."""

    cli: CommandLine

    images: int | None = None
    classes: int | None = None
    views: int | None = None
    image_size: int | None = None
    family: FamilyContract | None = None
    layout: dict | None = None
    rows: int | None = None
    rows_text: str = ""
    facts: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)  # inputs reported missing already
    made: set[str] = field(default_factory=set)  # what the pipeline's stages write (unknown until they ran)
    prepared: dict[str, tuple[int, int]] = field(default_factory=dict)  # a folder prepare writes: (images, classes)

    def present(self, path: Path | str) -> bool:
        """Whether `path` is there to read (a stage's output is read only if that stage ran already); a missing
        input not reported yet is reported (FileNotFoundError)."""
        where = os.path.normpath(os.path.abspath(path))
        if where in self.made or any(str(parent) in self.made for parent in Path(where).parents):
            return os.path.exists(path)
        if os.path.exists(path):
            return True
        if where not in self.missing:
            raise FileNotFoundError(f"{where} not found: fix the path, or put the file there")
        return False


def cache_rows(images: int, views: int, reflogp) -> tuple[int, str]:
    """The rows an epoch (a visit) of the reference cache will hold (pipeline.refcache.draw_pairs): one per image
    with `reflogp.views: one`, one per (image, view) with `all`; and the words for them."""
    per_image = views if reflogp.views == "all" else 1
    # reflogp.visits multiplies the cache's rows, not an epoch's: epoch e reads visit e, the rows counted here
    return images * per_image, f"an epoch (a visit) of the reference cache will hold ({images} images x {per_image} view{'s' * (per_image > 1)})"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _dvc_root(folder: Path) -> Path:
    """The DVC repository `folder` is in (the nearest folder above holding .dvc/), else `folder` itself."""
    return next((p for p in [folder, *folder.parents] if (p / ".dvc").is_dir()), folder)


def _stage_outputs(folder: Path) -> set[str]:
    """What the non-foreach stages of `folder`'s dvc.yaml write (outs, metrics, plots), as absolute paths."""
    from .cli.dvcstage import _variables

    dvc_yaml = folder / "dvc.yaml"
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    values = _variables(folder, spec)
    return {os.path.normpath(os.path.abspath(folder / _resolve(values, dvc_yaml, o))) for s in _plain_stages(spec).values()
            for kind in ("outs", "metrics", "plots") for o in _entries(s, kind)}


def _plain_stages(spec: dict) -> dict:
    return {n: s for n, s in (spec.get("stages") or {}).items()
            if isinstance(s, dict) and "foreach" not in s and "matrix" not in s}


def _entries(stage: dict, kind: str) -> list[str]:
    return [str(next(iter(e))) if isinstance(e, dict) else str(e) for e in stage.get(kind) or []]


def _resolve(values: dict, dvc_yaml: Path, text: str) -> str:
    from .cli.dvcstage import _lookup

    return re.sub(r"\$\{([^}]+)\}", lambda m: _lookup(values, m.group(1), str(dvc_yaml)), text)


def _missing_inputs(folder: Path, known: Known) -> list[str]:
    """Every dvc.yaml dep named by a params key (`${vq_ckpt}`) that no stage makes and that is not there. A stage
    of any dvc.yaml of the DVC repository makes a file (pipelines/paper reads the main pipeline's outputs, which
    `dvc repro` there builds first)."""
    from .cli.dvcstage import _variables

    dvc_yaml = folder / "dvc.yaml"
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    values = _variables(folder, spec)
    root = _dvc_root(folder)
    made = set().union(_stage_outputs(folder), *(_stage_outputs(f.parent) for pattern in ("dvc.yaml", "*/dvc.yaml", "*/*/dvc.yaml")
                                                 for f in root.glob(pattern)))
    known.made |= made
    problems, seen = [], set()
    fetched = _fetched(folder, spec)
    for name, stage in _plain_stages(spec).items():
        if _subcommand(stage) in ("fetch", "check"):  # the links' maker and the check itself: the readers are named
            continue
        for dep in _entries(stage, "deps"):
            dep = fetched.get(os.path.normpath(os.path.abspath(folder / dep)), dep)  # a fetched link: its source
            if "${" not in dep:  # the pipeline's code, or a file an earlier stage makes: DVC's to check
                continue
            source = _resolve(values, dvc_yaml, dep)
            if source.startswith("hf://"):  # a Hub id: resolved (or refused, in one line) by fetch and the stages
                continue
            path = os.path.normpath(os.path.abspath(folder / source))
            if path in made or path in seen or os.path.exists(path):
                continue
            seen.add(path)
            known.missing.add(path)
            keys = ", ".join(k.strip() for k in re.findall(r"\$\{([^}]+)\}", dep))
            problems.append(f"{keys} = {path}: not found (an input of stage {name!r}, from params.yaml's {keys}): fix the "
                            "path there, or put the file there")
    return problems


def _subcommand(stage: dict) -> str | None:
    words = str(stage.get("cmd", "")).split()
    return next((w for w in words[1:] if not w.startswith("-") and "=" not in w), None) if words[:1] == ["cca-pipe"] else None


def _fetched(folder: Path, spec: dict) -> dict[str, str]:
    """The links a `cca-pipe fetch` stage makes (`KEY=${KEY} ... --out DIR`: DIR/KEY), each to the params entry it
    links (`${KEY}`): a missing checkpoint is named by its key for the first stage that reads it, as before fetch."""
    links = {}
    for stage in _plain_stages(spec).values():
        if _subcommand(stage) != "fetch":
            continue
        words = str(stage["cmd"]).split()
        out = words[words.index("--out") + 1] if "--out" in words[:-1] else "data/checkpoints"
        for word in words:
            key, sep, source = word.partition("=")
            if sep and not key.startswith("-"):
                links[os.path.normpath(os.path.abspath(folder / out / key))] = source
    return links


def _settings(known: Known, ctx_obj: dict, stage: str):
    return known.cli.resolved_config(SimpleNamespace(obj=ctx_obj), stage)


def _arguments(main: click.Group, sub: str, args: list[str], ctx_obj: dict, folder: Path) -> dict:
    """The subcommand's options as the stage's command line gives them (click's parsing: defaults filled in),
    paths relative to `folder`, where DVC runs the stage."""
    command = main.commands[sub]
    with command.make_context(sub, list(args), parent=click.Context(main, obj=ctx_obj)) as sub_ctx:
        return {k: folder / v if isinstance(v, Path) else v for k, v in sub_ctx.params.items()}


def _source(known: Known, ctx_obj: dict, a: dict):
    from pipeline.families import ModelSource

    return ModelSource(a.get("gpt_model"), a.get("vae"), a.get("vae_model"), a.get("depth"),
                       known.cli.active_preset(SimpleNamespace(obj=ctx_obj)))


def _check_generator(path: Path, role: str, known: Known, source) -> int | None:
    """The file's class count where it is known."""
    from pipeline.families import family_of

    if not known.present(path):
        return None
    family = family_of(path, role)
    if known.family is not None and family is not known.family:
        raise ValueError(f"{path} is a {family.name} model but the tokenizer makes {known.family.name} tokens: use the "
                         "tokenizer of the model's family")
    if known.layout is None:
        return None
    return family.check_file(path, source, known.layout, known.image_size, known.classes or 0)


def _prepare(ctx_obj: dict, a: dict, known: Known) -> None:
    """The embedded default's image folders, counted from prepare's settings before it wrote them."""
    from pipeline.digits import split_counts

    cfg = _settings(known, ctx_obj, "prepare")
    for split, (images, classes) in split_counts(cfg.test_fraction).items():
        known.prepared[os.path.normpath(os.path.abspath(a["out"] / split))] = (images, classes)


def _tokenize(ctx_obj: dict, a: dict, known: Known) -> None:
    from pipeline.families import load_tokenizer
    from pipeline.images import list_image_folder, view_names

    cfg = _settings(known, ctx_obj, "tokenize")
    known.views = len(view_names(cfg.augment))
    prepared = known.prepared.get(os.path.normpath(os.path.abspath(a["images"])))
    if prepared is not None and not os.path.exists(a["images"]):  # prepare writes it: its counts are known now
        known.images, known.classes = prepared
        known.facts.append(f"{a['images']} (written by prepare): {known.images} images of {known.classes} classes, "
                           f"x {known.views} views (tokenize.augment {cfg.augment})")
    if not (known.present(a["images"]) and known.present(a["vq_path"])):
        return
    paths, _, classes = list_image_folder(a["images"])
    known.images, known.classes = len(paths), len(classes)
    family, tokenizer = load_tokenizer(a["vq_path"], a["vq_model"])
    try:
        known.layout = family.tokenizer_layout(tokenizer, cfg.image_size)
    except ValueError as e:
        raise ConfigError(f"{e}: set image_size (tokenize.image_size) to the tokenizer's") from None
    known.family, known.image_size = family, cfg.image_size
    known.facts.append(f"{a['images']}: {known.images} images of {known.classes} classes, x {known.views} views "
                       f"(tokenize.augment {cfg.augment}); {known.layout['seq_len']} tokens per view")


def _reflogp(ctx_obj: dict, a: dict, known: Known) -> None:
    cfg = _settings(known, ctx_obj, "reflogp")
    _check_generator(a["ref_path"], "--ref", known, _source(known, ctx_obj, a))
    if known.images is not None:
        known.rows, known.rows_text = cache_rows(known.images, known.views, cfg)
        known.facts.append(f"reference cache: {known.rows} rows (reflogp.views {cfg.views})")


def _train(ctx_obj: dict, a: dict, known: Known) -> None:
    from pipeline.parallel import check_batch_rows, check_micro_batches

    cfg = _settings(known, ctx_obj, "train")
    _check_generator(a["init"], "--init", known, _source(known, ctx_obj, a))
    if known.rows is not None:
        check_batch_rows(cfg.batch_size, known.rows, known.rows_text, TRIAL_FIX)
    launch = known.cli.launch_config(SimpleNamespace(obj=ctx_obj), None, None, None)
    check_micro_batches(cfg.batch_size, cfg.micro_batch_size, launch.nproc_per_node * launch.nnodes)


def _eval(ctx_obj: dict, a: dict, known: Known) -> None:
    from .eval import check_eval_classes

    cfg = _settings(known, ctx_obj, "eval")
    classes = _check_generator(a["base_path"], "--base", known, _source(known, ctx_obj, a))
    if classes is not None:
        check_eval_classes(cfg, classes, "--base", a["base_path"])


CHECKS = {"prepare": _prepare, "tokenize": _tokenize, "reflogp": _reflogp, "train": _train, "eval": _eval}


def check_folder(folder: Path, obj: dict, cli: CommandLine) -> tuple[list[str], list[str]]:
    """(problems, facts) of the dvc.yaml in `folder`, each one line; `obj`: the cca-pipe command's settings
    context (its --params, --preset, --set), under which every stage's own options are applied; `cli`: the
    command line's parts (stages.cli.main.command_line())."""
    from .cli.dvcstage import stage_commands, with_stage_options

    commands = [c for c in stage_commands(folder) if c[1] != "check"]
    if not commands:
        return [f"{folder / 'dvc.yaml'}: no `cca-pipe` stage to check (run cca-pipe check in a pipeline's folder)"], []
    known = Known(cli)
    problems = _missing_inputs(folder, known)
    found: dict[str, list[str]] = {}  # a problem -> the stages it stops (each said once)
    for name, sub, options, args in commands:
        ctx_obj = with_stage_options(obj, options)
        try:
            a = _arguments(cli.main, sub, args, ctx_obj, folder)
            if sub in CHECKS:
                CHECKS[sub](ctx_obj, a, known)
            elif sub in cli.stages:  # a stage's settings are built (so checked) by _settings; `paper` has its own params
                _settings(known, ctx_obj, sub)
        except (ConfigError, CheckpointError, FormatError, OutputError, ValueError, FileNotFoundError,
                click.ClickException) as e:
            found.setdefault(_one_line(e.format_message() if isinstance(e, click.ClickException) else e), []).append(name)
    problems += [f"stage{'s' * (len(names) > 1)} {', '.join(map(repr, names))}: {text}" for text, names in found.items()]
    return problems, known.facts
