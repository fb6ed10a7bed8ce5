"""The `cca-pipe` command line: one subcommand per stage, hyperparameters from params.yaml.

Paths are options (defaults: the embedded default's layout under data/); hyperparameters come from the
stage's params.yaml section, with `--set section.key=value` overrides. Every subcommand is also a DVC
stage in dvc.yaml.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .launch import DISTRIBUTED, QUIET_PEERS, LaunchConfig, exit_without_teardown, relaunch
from .params import as_params, build, load_params, parse_overrides

if TYPE_CHECKING:
    from pipeline.families import ModelSource

PathType = click.Path(path_type=Path)
# what cca-pipe writes beside an output: `.<name>.lock`, `<name>.partial`, `<name>.old`, `.<name>.<pid>.tmp`
COMPANION_BYTES = len("..4194304.tmp")


class OutputPathType(click.Path):
    """An output path (--out), checked when the command line is read, before any work: a name whose companions
    stay within the file system's name limit, parents that are directories, and places this user may write."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        check_output_path(path)
        return path


def check_output_path(path: Path) -> None:
    from pipeline.outputs import OutputError

    try:
        existing = next(p for p in (path, *path.parents) if p.exists())  # the nearest existing one ("." or "/" at worst)
    except OSError as e:  # ENAMETOOLONG: a name of more than 255 bytes, or a path of more than PATH_MAX
        longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
        raise OutputError(f"--out {path}: {e.strerror} for this file system: its name {longest[:40]!r}... is "
                          f"{len(os.fsencode(longest))} bytes (the usual limit: 255 per name, 4096 for the whole path); "
                          "choose a shorter output path") from None
    if not existing.is_dir():
        if existing != path:
            raise OutputError(f"--out {path}: {existing} is a file, not a directory, so nothing can be written under it; "
                              "choose another output path")
        existing = existing.parent  # a file output: it is replaced by a rename in its directory
    limit = os.pathconf(existing, "PC_NAME_MAX")
    if len(os.fsencode(path.name)) + COMPANION_BYTES > limit:
        raise OutputError(f"--out {path}: the name is {len(os.fsencode(path.name))} bytes; cca-pipe writes companions beside "
                          f"it (.<name>.lock, <name>.partial) that must stay within this file system's {limit}-byte "
                          f"limit: choose a name of at most {limit - COMPANION_BYTES} bytes")
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only target directory or parent fails only at the commit
        raise OutputError(f"--out {path}: {existing} is not writable by this user (read-only): make it writable or choose "
                          "another output path")


OutPath = OutputPathType(path_type=Path)


class InputFileType(click.Path):
    """A checkpoint, tokenizer or reference file: a local path, or a Hub reference `hf://org/repo/file[@revision]`
    resolved here, once for every such option, to the file in huggingface_hub's cache (pipeline/hub.py; its commit
    goes into the outputs' provenance)."""

    def convert(self, value, param, ctx):
        from pipeline.hub import is_hub_ref, resolve

        if not is_hub_ref(value):
            return super().convert(value, param, ctx)
        # a HubError is one line naming the id (the option's value) and the fix, printed by guarded(); the same for
        # every option naming the same file, so `cca-pipe check` says it once for all the stages reading it
        return resolve(value).path


InFile = InputFileType(path_type=Path)
GPT_MODEL_HELP = "GPT config for upstream checkpoints (they carry none): a name (GPT-B ... GPT-3B) or a JSON file"
VAE_HELP = "VAR only: the VQVAE checkpoint (vae_ch160v4096z32.pth) whose quantiser builds VAR's input"
VAE_MODEL_HELP = "VAR only: the VQVAE's config, a name (vae_ch160v4096z32, the default) or a JSON file"
DEPTH_HELP = "VAR only: expected depth (16, 20, 24, 30); checked against the checkpoint"


# stage command -> (its module under stages/, its config class, its params.yaml section)
PLANNED_STAGES = ["train", "tokenize", "eval", "negatives"]  # what `cca-pipe plan` plans the memory of

STAGES = {
    "prepare": ("prepare", "PrepareConfig", "prepare"),
    "pretrain-vq": ("pretrain_vq", "PretrainVQConfig", "pretrain_vq"),
    "pretrain-classifier": ("pretrain_classifier", "PretrainClassifierConfig", "pretrain_classifier"),
    "tokenize": ("tokenize", "TokenizeConfig", "tokenize"),
    "pretrain-ar": ("pretrain_ar", "PretrainARConfig", "pretrain_ar"),
    "reflogp": ("reflogp", "RefLogpConfig", "reflogp"),
    "negatives": ("negatives", "NegativesConfig", "negatives"),
    "train": ("train", "TrainConfig", "train"),
    "eval": ("eval", "EvalConfig", "eval"),
    "select": ("select_policy", "SelectConfig", "select"),
    "import-codes": ("import_codes", "ImportCodesConfig", "import_codes"),
    "report": ("report", "SweepConfig", "sweep"),  # the sweep points it collects
}


def verb(module: str):
    """The stage module `stages.<module>` (a STAGES entry's module, or a command's), imported when a command needs it.
    By name, not by an import statement: the verbs import this room (its params, presets and loaders), so the room
    sits under them and reaches up to them only by name, one stage per command run (docs/developing.md)."""
    return importlib.import_module(f"stages.{module}")


def resolved_config(ctx: click.Context, stage: str):
    """The stage's config: its defaults <- params.yaml's preset <- params.yaml <- --preset <- --set. Every other
    stage's section is built (so checked) too, after this one's: settings that cannot work (e.g. eval.methods
    with cfg but no eval.cfg_scales) are refused by the first stage that reads them, not after days of work."""
    params = load_params(ctx.obj["params"])
    overrides = parse_overrides(ctx.obj["overrides"], params, ctx.obj["params"])
    configs = {}
    for name in (stage, *(s for s in STAGES if s != stage)):
        module, cls, section = STAGES[name]
        config_class = getattr(verb(module), cls)
        configs[name] = build(config_class, params, section, ctx.obj["preset"], overrides, source=ctx.obj["params"])
    # reflogp.visits "epochs": one visit per epoch of the resolved train settings (not their lambda or beta: a
    # sweep shares one cache)
    configs["reflogp"] = configs["reflogp"].resolve_visits(configs["train"].epochs)
    return configs[stage]


def _setup(ctx: click.Context, stage: str | None = None):
    """(the stage's resolved config, this process's World: its device, and under torchrun its rank)."""
    from pipeline.distributed import check_same_job, init_world, shutdown_world

    cfg = resolved_config(ctx, stage) if stage else None
    world = init_world(ctx.obj["device"])
    ctx.call_on_close(shutdown_world)
    if stage in DISTRIBUTED:
        check_same_job(world, _job_facts(ctx, stage, cfg))
    return cfg, world


def _job_facts(ctx: click.Context, stage: str, cfg) -> dict[str, object]:
    """What every process of a job must agree on: the stage's resolved settings, the preset, the device and
    the subcommand's options (paths with what is at them)."""
    from pipeline.distributed import file_identity

    facts: dict[str, object] = {f"{STAGES[stage][2]}.{k}": v for k, v in as_params(cfg).items()}
    facts.update({"--preset": active_preset(ctx), "--device": ctx.obj["device"]})
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        name = param.opts[0] if param.opts else param.name
        facts[name] = str(value) if isinstance(value, Path) else value
        if isinstance(value, Path):
            facts[f"{name} (what is there)"] = file_identity(value)
    return facts


def stacked_options(*options):
    """Click options as one decorator, listed in --help in the order given."""

    def add(command):
        for option in reversed(options):  # click lists options bottom-up: reversed keeps the order given
            command = option(command)
        return command

    return add


def model_source_options(vae_type: click.ParamType):
    """The options `_model_source` reads (--gpt-model, --vae, --vae-model, --depth), as one decorator for the
    commands that load a model from a checkpoint."""
    return stacked_options(click.option("--gpt-model", default=None, help=GPT_MODEL_HELP),
                           click.option("--vae", default=None, type=vae_type, help=VAE_HELP),
                           click.option("--vae-model", default=None, help=VAE_MODEL_HELP),
                           click.option("--depth", default=None, type=int, help=DEPTH_HELP))


def _model_source(ctx: click.Context, gpt_model: str | None, vae: Path | None, vae_model: str | None,
                  depth: int | None) -> ModelSource:
    from pipeline.families import ModelSource

    return ModelSource(gpt_model, vae, vae_model, depth, active_preset(ctx))


def active_preset(ctx: click.Context) -> str | None:
    from .presets import active

    return active(load_params(ctx.obj["params"]), ctx.obj["preset"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", default="params.yaml", show_default=True, type=PathType, help="params file")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a parameter")
@click.option("--preset", default=None, metavar="NAME",
              help="a released recipe (stages/cli/presets.py: llamagen-B ... llamagen-3B, var-d16 ... var-d30); over params.yaml")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
@click.option("--nproc-per-node", type=int, default=None, help="run reflogp/train/eval under torchrun with N processes (default: launch.nproc_per_node)")
@click.option("--nnodes", type=int, default=None, help="nodes of a multi-node job (default: launch.nnodes)")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="multi-node rendezvous, the same on every node")
@click.option("--rdzv-id", default=None, metavar="ID",
              help="this job's rendezvous id, the same on every node (default: launch.rdzv_id, else the scheduler's job id, "
                   "else a digest of the command line)")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.pass_context
def main(ctx: click.Context, params: Path, overrides: tuple[str, ...], preset: str | None, device: str,
         nproc_per_node: int | None, nnodes: int | None, rdzv_endpoint: str | None, rdzv_id: str | None,
         verbose: bool) -> None:
    """cca-pipe: Condition Contrastive Alignment for autoregressive image generators, offline."""
    from pipeline.hub import forget as forget_hub_inputs
    from pipeline.ranks import launched, rank_zero

    level = (logging.DEBUG if verbose else logging.INFO) if rank_zero() else logging.WARNING  # rank 0 logs for the job
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ctx.obj = {"params": params, "overrides": list(overrides), "device": device, "preset": preset}
    forget_hub_inputs()  # a command's provenance names the Hub files it read, not an earlier one's in this process
    if ctx.invoked_subcommand in PLANNED_STAGES:
        from pipeline.host import return_freed_memory

        # the process's memory is its live tensors', as `cca-pipe plan` counts them; elsewhere glibc's default
        # (mapping every freed block back costs CPU: +37% on pretrain-vq, docs/performance.md)
        return_freed_memory()
    if ctx.invoked_subcommand in DISTRIBUTED and not launched():
        launch = _launch_config(ctx, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id)
        if launch.nproc_per_node > 1 or launch.nnodes > 1:
            if ctx.invoked_subcommand == "train":  # settings that cannot work with this many processes: before any starts
                from pipeline.parallel import check_micro_batches

                cfg = resolved_config(ctx, "train")
                check_micro_batches(cfg.batch_size, cfg.micro_batch_size, launch.nproc_per_node * launch.nnodes)
            ctx.exit(relaunch(launch, sys.argv[1:]))


def _launch_config(ctx: click.Context, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id=None) -> LaunchConfig:
    """params.yaml's launch section, `--set launch.*` over it, the command line's options over both."""
    params = load_params(ctx.obj["params"]) if Path(ctx.obj["params"]).is_file() else {}
    overrides = parse_overrides(ctx.obj["overrides"], params, ctx.obj["params"])
    flags = {k: v for k, v in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes), ("rdzv_endpoint", rdzv_endpoint),
                               ("rdzv_id", rdzv_id)) if v is not None}
    return build(LaunchConfig, params, "launch", overrides={"launch": {**overrides.get("launch", {}), **flags}},
                 source=ctx.obj["params"])


def as_dvc_stage(ctx: click.Context, command: str) -> tuple[str, list[str], list[str]] | None:
    """In a folder with a dvc.yaml, make ctx's settings those its stage running `cca-pipe <command>` passes (stages/
    dvcstage.py); (the stage's name, its global options, its subcommand's arguments), or None. `config` and `plan`
    both resolve through this, so what they show and plan is what `dvc repro` runs."""
    from .dvcstage import stage_arguments, stage_options, with_stage_options

    found = stage_options(Path.cwd(), command)
    if not found:
        return None
    ctx.obj = with_stage_options(ctx.obj, found[1])
    return found[0], found[1], stage_arguments(Path.cwd(), command)[2]


@main.command()
@click.argument("stage", type=click.Choice(list(STAGES)))
@click.option("--preset", default=None, metavar="NAME", help="show the settings under this recipe")
@click.pass_context
def config(ctx, stage, preset):
    """Print a stage's fully resolved settings as YAML (defaults <- params.yaml's preset <- params.yaml <- --preset
    <- --set); in a folder with a dvc.yaml, with the options its stage's command line passes: what `dvc repro` runs."""
    from .params import settings_yaml

    if preset:
        ctx.obj["preset"] = preset
    found = as_dvc_stage(ctx, stage)
    if found:
        click.echo(f"# as dvc.yaml's stage {found[0]!r} runs it: {' '.join(found[1]) or '(no options)'}")
    click.echo(settings_yaml({STAGES[stage][2]: resolved_config(ctx, stage)}, active_preset(ctx)), nl=False)


def command_line():
    """What `cca-pipe check` reads stages by (stages/check.py CommandLine), handed to it from here."""
    return verb("check").CommandLine(main, resolved_config, active_preset, _launch_config, STAGES)


@main.command()
@click.option("--out", default=None, type=OutPath, help="write a record here when every check passes (the DVC stage's output)")
@click.pass_context
def check(ctx, out):
    """Check every stage of the dvc.yaml in this folder against what is known before the first one runs (images,
    views, checkpoints' shapes, inputs): one line per problem, naming the key and a fix; exit status 2 if any."""
    from pipeline.outputs import write_text

    checks = verb("check")
    problems, facts = checks.check_folder(Path.cwd(), ctx.obj, command_line())
    for fact in facts:
        click.echo(f"cca-pipe check: {fact}")
    for problem in problems:
        click.echo(f"cca-pipe: check: {problem}", err=True)
    if problems:
        sys.exit(2)
    if out is not None:
        write_text(out, checks.RECORD)
    click.echo("cca-pipe check: every stage's settings fit the inputs")


@main.command()
@click.option("--out", default="data/images", type=OutPath, show_default=True)
@click.pass_context
def prepare(ctx, out):
    """Write scikit-learn's digits as class folders (embedded default)."""
    stage = verb("prepare")
    cfg, _ = _setup(ctx, "prepare")
    stage.run(cfg, out)


@main.command("pretrain-vq")
@click.option("--images", default="data/images/train", type=PathType, show_default=True)
@click.option("--out", default="data/vq/vq.pt", type=OutPath, show_default=True)
@click.pass_context
def pretrain_vq(ctx, images, out):
    """Train a small LlamaGen-design VQ tokenizer (embedded default)."""
    stage = verb("pretrain_vq")
    cfg, world = _setup(ctx, "pretrain-vq")
    stage.run(cfg, images, out, world.device)


@main.command("pretrain-classifier")
@click.option("--train", "train_dir", default="data/images/train", type=PathType, show_default=True)
@click.option("--test", "test_dir", default="data/images/test", type=PathType, show_default=True)
@click.option("--out", default="data/classifier/classifier.pt", type=OutPath, show_default=True)
@click.pass_context
def pretrain_classifier(ctx, train_dir, test_dir, out):
    """Train the evaluator's classifier (embedded default)."""
    stage = verb("pretrain_classifier")
    cfg, world = _setup(ctx, "pretrain-classifier")
    stage.run(cfg, train_dir, test_dir, out, world.device)


@main.command()
@click.option("--images", default="data/images/train", type=PathType, show_default=True)
@click.option("--vq", "vq_path", default="data/vq/vq.pt", type=InFile, show_default=True,
              help="the tokenizer: LlamaGen's VQ or VAR's VQVAE (told apart by its keys)")
@click.option("--vq-model", default=None, help="VQ config for upstream files: a name (VQ-16) or a JSON file")
@click.option("--out", default="data/tokens/train.zarr", type=OutPath, show_default=True)
@click.option("--rehash", is_flag=True,
              help="hash every image again instead of trusting an unchanged stat (size, mtime, ctime, inode): after "
                   "edits that keep all four, e.g. on a file system that does not keep ctime (docs/safety.md)")
@click.pass_context
def tokenize(ctx, images, vq_path, vq_model, out, rehash):
    """Images -> frozen VQ tokenizer -> Zarr token store (resumable)."""
    stage = verb("tokenize")
    cfg, world = _setup(ctx, "tokenize")
    stage.run(cfg, images, vq_path, out, world.device, vq_model, rehash)


@main.command("import-codes")
@click.option("--codes", "codes_dir", required=True, type=PathType, help="LlamaGen's imagenet<size>_codes folder")
@click.option("--labels", "labels_dir", required=True, type=PathType, help="LlamaGen's imagenet<size>_labels folder")
@click.option("--vq", "vq_path", required=True, type=InFile, help="the tokenizer the codes came from (provenance)")
@click.option("--vq-model", default="VQ-16", show_default=True, help="VQ config: a name or a JSON file")
@click.option("--class-names-from", default=None, type=PathType, help="ImageNet train folder: class names = sorted sub-folders")
@click.option("--out", required=True, type=OutPath)
@click.pass_context
def import_codes(ctx, codes_dir, labels_dir, vq_path, vq_model, class_names_from, out):
    """Import codes extracted by LlamaGen's extract_codes_c2i.py (no re-encoding); settings: import_codes."""
    stage = verb("import_codes")
    cfg, _ = _setup(ctx, "import-codes")
    names = sorted(d.name for d in class_names_from.iterdir() if d.is_dir()) if class_names_from else None
    stage.run(cfg, codes_dir, labels_dir, vq_path, out, names, vq_model)


@main.command("pretrain-ar")
@click.option("--tokens", "tokens_path", default="data/tokens/train.zarr", type=PathType, show_default=True)
@click.option("--out", default="data/ar/gpt.pt", type=OutPath, show_default=True)
@click.pass_context
def pretrain_ar(ctx, tokens_path, out):
    """Train a small class-conditional GPT with class dropout (embedded default)."""
    stage = verb("pretrain_ar")
    cfg, world = _setup(ctx, "pretrain-ar")
    stage.run(cfg, tokens_path, out, world.device)


@main.command()
@click.option("--tokens", "tokens_path", default="data/tokens/train.zarr", type=PathType, show_default=True)
@click.option("--ref", "ref_path", default="data/ar/gpt.pt", type=InFile, show_default=True)
@model_source_options(InFile)
@click.option("--negatives", "negatives_path", default=None, type=PathType,
              help="DDO: the negatives store of these rows drawn by --ref (cca-pipe negatives); adds ref_logp_fake")
@click.option("--out", default="data/reflogp/ref_logp.parquet", type=OutPath, show_default=True)
@click.pass_context
def reflogp(ctx, tokens_path, ref_path, gpt_model, vae, vae_model, depth, negatives_path, out):
    """Cache the frozen reference model's log-likelihoods (Parquet)."""
    stage = verb("reflogp")
    cfg, world = _setup(ctx, "reflogp")
    stage.run(cfg, tokens_path, ref_path, out, _model_source(ctx, gpt_model, vae, vae_model, depth), world, negatives_path)


@main.command()
@click.option("--tokens", "tokens_path", default="data/tokens/train.zarr", type=PathType, show_default=True,
              help="the real rows: one fake per image (negatives.ratio) at its label")
@click.option("--ref", "ref_path", default="data/ar/gpt.pt", type=PathType, show_default=True, help="the reference that draws them")
@click.option("--vq", "vq_path", default="data/vq/vq.pt", type=PathType, show_default=True,
              help="the tokenizer that encoded --tokens: it decodes the samples (and re-encodes them)")
@click.option("--vq-model", default=None, help="VQ config for upstream files: a name (VQ-16) or a JSON file")
@model_source_options(PathType)
@click.option("--out", default="data/ddo/negatives.zarr", type=OutPath, show_default=True)
@click.pass_context
def negatives(ctx, tokens_path, ref_path, vq_path, vq_model, gpt_model, vae, vae_model, depth, out):
    """DDO's negatives: the reference's samples for the real rows' labels -> Zarr token store (resumable)."""
    stage = verb("negatives")
    cfg, world = _setup(ctx, "negatives")
    stage.run(cfg, tokens_path, ref_path, vq_path, out, _model_source(ctx, gpt_model, vae, vae_model, depth), vq_model, world)


@main.command()
@click.option("--tokens", "tokens_path", default="data/tokens/train.zarr", type=PathType, show_default=True)
@click.option("--cache", "cache_path", default="data/reflogp/ref_logp.parquet", type=PathType, show_default=True)
@click.option("--init", "init", default="data/ar/gpt.pt", type=InFile, show_default=True, help="reference checkpoint the policy starts from")
@model_source_options(InFile)
@click.option("--negatives", "negatives_path", default=None, type=PathType,
              help="train.loss ddo: the negatives store the DDO cache (--cache) was computed from")
@click.option("--out", default="data/train", type=OutPath, show_default=True)
@click.pass_context
def train(ctx, tokens_path, cache_path, init, gpt_model, vae, vae_model, depth, negatives_path, out):
    """Fine-tune the policy with CCA over the cached reference log-probs."""
    stage = verb("train")
    cfg, world = _setup(ctx, "train")
    stage.run(cfg, tokens_path, cache_path, init, out, _model_source(ctx, gpt_model, vae, vae_model, depth), world,
              negatives_path)


@main.command("eval")
@click.option("--vq", "vq_path", default="data/vq/vq.pt", type=InFile, show_default=True,
              help="the tokenizer that decodes samples: LlamaGen's VQ or VAR's VQVAE")
@click.option("--base", "base_path", default="data/ar/gpt.pt", type=InFile, show_default=True)
@click.option("--policy", "policy_path", default="data/train/policy.pt", type=InFile, show_default=True)
@click.option("--reference", default="data/images/test", type=InFile, show_default=True, help="held-out real images")
@click.option("--classifier", "classifier_path", default=None, type=InFile,
              help="classifier checkpoint: the feature extractor (eval.feature_extractor: classifier) and class accuracy")
@click.option("--gpt-model", default=None, help=GPT_MODEL_HELP)
@click.option("--vq-model", default=None, help="VQ config for upstream files: a name (VQ-16) or a JSON file")
@click.option("--depth", default=None, type=int, help=DEPTH_HELP)
@click.option("--methods", default=None,
              help="comma-separated subset of base, cfg, cca, cca_cfg (the policy with guidance at eval.cfg_scales); "
                   "overrides eval.methods (default base,cfg,cca)")
@click.option("--cfg-scale", "cfg_scales", multiple=True, type=float, help="guidance scale s (repeatable); overrides eval.cfg_scales")
@click.option("--fidelity-cache", default=None, type=PathType,
              help="cache of the reference images' features, shared by evaluations (default: $XDG_CACHE_HOME/cca-pipe/fidelity, "
                   "else ~/.cache/cca-pipe/fidelity)")
@click.option("--out", default="data/eval", type=OutPath, show_default=True)
@click.pass_context
def eval_(ctx, vq_path, base_path, policy_path, reference, classifier_path, gpt_model, vq_model, depth, methods, cfg_scales,
          fidelity_cache, out):
    """Sample base (with/without CFG) and CCA policy, score with torch-fidelity, print the table."""
    import json

    from pipeline.families import ModelSource

    stage = verb("eval")
    if cfg_scales:  # the one --set it stands for, so the config is still built (and checked) in one place
        ctx.obj["overrides"].append(f"eval.cfg_scales={list(cfg_scales)}")
    if methods is not None:  # likewise
        ctx.obj["overrides"].append(f"eval.methods={json.dumps([m.strip() for m in methods.split(',') if m.strip()])}")
    cfg, world = _setup(ctx, "eval")
    metrics = stage.run(cfg, vq_path, base_path, policy_path, reference, classifier_path, out,
                        ModelSource(gpt_model=gpt_model, depth=depth), vq_model, fidelity_cache, world)
    if metrics is not None:  # the main process's
        click.echo(stage.format_results(metrics))


@main.command("select")
@click.option("--run", "run_dir", required=True, type=InFile, help="a train run's folder (`cca-pipe train --out`)")
@click.option("--vq", "vq_path", default=None, type=InFile, help="select.rule best: the tokenizer that decodes samples, as eval's")
@click.option("--vq-model", default=None, help="VQ config for upstream files: a name (VQ-16) or a JSON file")
@click.option("--reference", default=None, type=InFile, help="select.rule best: held-out real images, as eval's")
@click.option("--classifier", "classifier_path", default=None, type=InFile, help="select.rule best: as eval's --classifier")
@click.option("--fidelity-cache", default=None, type=PathType, help="cache of the reference images' features, as eval's")
@click.option("--out", required=True, type=OutPath)
@click.pass_context
def select_(ctx, run_dir, vq_path, vq_model, reference, classifier_path, fidelity_cache, out):
    """The policy a train run hands on (the next DDO round's reference) by select.rule: its final policy, or the
    lowest-FID of its numbered checkpoints scored by eval's settings; writes policy.pt and selection.json."""
    stage = verb("select_policy")
    eval_cfg = resolved_config(ctx, "eval")
    cfg, world = _setup(ctx, "select")
    record = stage.run(cfg, eval_cfg, run_dir, out, vq_path, reference, classifier_path, fidelity_cache, vq_model, world)
    click.echo(f"selected step {record['selected_step']}: {record['why']}")


@main.command()
@click.argument("samples", type=PathType)
@click.option("--reference", required=True, type=InFile,
              help="an ADM reference batch (VIRTUAL_imagenet256_labeled.npz: FID/sFID against its mu/sigma, mu_s/sigma_s) "
                   "or a folder of real images")
@click.option("--classifier", "classifier_path", default=None, type=InFile,
              help="classifier checkpoint: the feature extractor (eval.feature_extractor: classifier) and class accuracy "
                   "(against the file's arr_1)")
@click.option("--fidelity-cache", default=None, type=PathType, help="cache of the reference images' features, as eval's")
@click.option("--json", "json_out", default=None, type=OutPath, help="also write the metrics to this JSON file")
@click.pass_context
def score(ctx, samples, reference, classifier_path, fidelity_cache, json_out):
    """Score a sample file (an ADM `.npz`: arr_0 uint8 N x H x W x 3, e.g. the release's own) against a reference:
    FID, sFID (Inception), IS, precision, recall, exactly as eval scores its sets, with eval's settings."""
    stage = verb("score")
    cfg = resolved_config(ctx, "eval")
    _, world = _setup(ctx)
    click.echo(stage.format_scores(stage.run(cfg, samples, reference, classifier_path, world.device, fidelity_cache, json_out)))


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="NAME=SOURCE...")
@click.option("--out", default="data/checkpoints", type=OutPath, show_default=True, help="the folder of the links")
@click.option("--pinned", is_flag=True, help="refuse a Hub id without its commit (@<40 hex>): the shipped pipelines' rule")
def fetch(inputs, out, pinned):
    """Link each SOURCE (a local file, or a Hub id hf://org/repo/file@<commit>, fetched into huggingface_hub's cache
    unless HF_HUB_OFFLINE=1) as OUT/NAME: what the shipped pipelines' stages name as their DVC dependency."""
    stage = verb("fetch")
    for line in stage.run(inputs, out, pinned):
        click.echo(f"cca-pipe fetch: {line}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=OutPath, help="the folder to write (model.safetensors, config.json, README.md)")
@click.option("--eval", "eval_dir", default=None, type=PathType,
              help="the policy's `cca-pipe eval` folder, whose metrics go into the card (default: RUN_DIR/../eval if there)")
def export(run_dir, out, eval_dir):
    """A trained policy (a `cca-pipe train` folder) as a Hub-ready folder: safetensors weights, the peer class's
    config and a model card. Nothing is uploaded: `huggingface-cli upload <user>/<repo> FOLDER` is yours."""
    stage = verb("export")
    click.echo(f"cca-pipe export: wrote {stage.run(run_dir, out, eval_dir)}")


@main.command()
@click.option("--eval", "eval_dir", default="data/eval", type=PathType, show_default=True)
@click.option("--train", "train_dir", default="data/train", type=PathType, show_default=True)
@click.option("--sweep", "sweep_dir", default="data/sweep", type=PathType, show_default=True)
@click.option("--out", default="data/report", type=OutPath, show_default=True)
@click.pass_context
def report(ctx, eval_dir, train_dir, sweep_dir, out):
    """Figures (FID-IS trade-off, training curves, sample comparison) and a table of every evaluated point
    (the main run, and the sweep points listed in params.yaml's `sweep` section)."""
    stage = verb("report")
    click.echo(stage.run(eval_dir, train_dir, sweep_dir, out, resolved_config(ctx, "report")))


@main.command()
@click.option("--eval", "eval_dir", default="data/eval", type=PathType, show_default=True)
@click.option("--train", "train_dir", default="data/train", type=PathType, show_default=True)
@click.option("--sweep", "sweep_dir", default="data/sweep", type=PathType, show_default=True)
@click.option("--paper-dir", default="data/paper", type=PathType, show_default=True, help="the runs of pipelines/paper")
@click.option("--paper-params", default="pipelines/paper/params.yaml", type=PathType, show_default=True)
@click.option("--cache", default="data/reflogp/ref_logp.parquet", type=PathType, show_default=True,
              help="the main run's reference cache (eval mode), against which the dropout experiment's is compared")
@click.option("--out", default="data/paper/report", type=OutPath, show_default=True)
@click.pass_context
def paper(ctx, eval_dir, train_dir, sweep_dir, paper_dir, paper_params, cache, out):
    """The paper's Table 3 (DPO, Unlearning), Figures 5-6 (CCA+CFG) and Table 5 (a lambda-conditioned policy)
    on the embedded default, from the runs of pipelines/paper (`make paper`)."""
    stage = verb("paper")
    paper = build(stage.PaperConfig, load_params(paper_params), "paper")
    click.echo(stage.run(eval_dir, train_dir, sweep_dir, paper_dir, cache, out, resolved_config(ctx, "report"), paper))


@main.command("ddo-vs-cca")
@click.option("--eval", "eval_dir", default="data/eval", type=PathType, show_default=True, help="the main run's (base, CFG)")
@click.option("--sweep", "sweep_dir", default="data/sweep", type=PathType, show_default=True, help="the main run's CFG scales")
@click.option("--seeds-dir", default="data/paper/seeds", type=PathType, show_default=True,
              help="the runs of pipelines/paper's seeds-* stages")
@click.option("--paper-params", default="pipelines/paper/params.yaml", type=PathType, show_default=True)
@click.option("--out", default="data/paper/seeds/report", type=OutPath, show_default=True)
@click.pass_context
def ddo_vs_cca(ctx, eval_dir, sweep_dir, seeds_dir, paper_params, out):
    """DDO (rounds 1 and 2) against CCA, the best CFG and the base model over fine-tuning seeds, each at its best
    grid point, and the train cost of each (pipelines/paper, `make paper`; docs/paper.md)."""
    stage = verb("ddo_vs_cca")
    paper = build(stage.PaperConfig, load_params(paper_params), "paper")
    click.echo(stage.run(eval_dir, sweep_dir, seeds_dir, out, resolved_config(ctx, "report"), paper))


class MemorySize(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        from pipeline.memplan import parse_memory

        try:
            return value if isinstance(value, int) else parse_memory(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


plan_options = stacked_options(
    click.option("--preset", default=None, metavar="NAME", help="the recipe to plan (its model, micro-batch, strategy)"),
    click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
                 help="processes (GPUs) per node (default: the global option, else launch.nproc_per_node)"),
    click.option("--nnodes", type=click.IntRange(min=1), default=None, help="nodes (default: the global option, else launch.nnodes)"),
    click.option("--gpu-memory", type=MemorySize(), default=None,
                 help="one GPU's memory: 80GB, 80GiB, 24G (GB and G: 10^9 bytes, GiB: 2^30); says what fits"),
    click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None, help="plan only this strategy (default: both)"),
    click.option("--micro-batch-size", type=click.IntRange(min=1), default=None, help="rows per forward (overrides train.micro_batch_size)"),
    click.option("--device", "device_type", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
                 help="what the plan is for: cuda (bf16 compute) or cpu (float32 throughout)"),
    click.option("--stage", type=click.Choice(PLANNED_STAGES), default="train", show_default=True,
                 help="the stage to plan: train (a training step), tokenize (the encoder at tokenize.batch_size x views), "
                      "eval (sampling, decoding and scoring at eval.batch_size), negatives (sampling, decoding and "
                      "re-encoding at negatives.batch_size)"),
    click.option("--vq-model", default=None, metavar="NAME|JSON",
                 help="tokenize/eval: the tokenizer's config (default: the family's, VQ-16 or VAR's VQVAE)"),
    click.option("--tokens", default=None, type=PathType,
                 help="train: the token store it trains on, whose token count the model runs (default: the dvc.yaml train "
                      "stage's --tokens; before it exists, what the folder's tokenize stage will write; else the preset's)"),
)


@main.command()
@plan_options
@click.pass_context
def plan(ctx, preset, nproc_per_node, nnodes, gpu_memory, strategy, micro_batch_size, device_type, stage, vq_model, tokens):
    """Per-rank memory of a preset's training step (weights, gradients, optimizer state, activations), DDP and
    FSDP, with and without activation checkpointing; with --gpu-memory, whether each fits. --stage tokenize
    or eval: the memory of tokenize's encoder forward, or of eval's sampling, decoding and scoring, and the
    batch size that fits. The settings are resolved as `cca-pipe config STAGE` resolves them (in a folder with
    a dvc.yaml, with its stage's options): the plan is for what the stage will run."""
    from pipeline.config import ConfigError

    stage_module = verb("plan")
    from .dvcstage import subcommand_option
    from .presets import PRESETS

    if preset:
        ctx.obj["preset"] = preset
    base = dict(ctx.obj)
    found = as_dvc_stage(ctx, stage) if Path(ctx.obj["params"]).is_file() else None  # without a params file: the preset alone
    has_params = Path(ctx.obj["params"]).is_file()  # the stage's --params, if it names one
    name = active_preset(ctx) if has_params else ctx.obj["preset"]
    if not name:
        raise ConfigError(f"cca-pipe plan needs a preset (--preset NAME); known: {', '.join(PRESETS)}")
    if micro_batch_size is not None:  # the one --set it stands for, so the settings are still checked in one place
        ctx.obj["overrides"] = [*ctx.obj["overrides"], f"train.micro_batch_size={micro_batch_size}"]
    given = ctx.parent.params  # the global --nproc-per-node / --nnodes, if given there
    launch = _launch_config(ctx, nproc_per_node or given.get("nproc_per_node"), nnodes or given.get("nnodes"), None)
    cfg = _plan_settings(ctx, stage)
    arguments = found[2] if found else []
    vq_model = vq_model or subcommand_option(arguments, "--vq-model")
    if stage != "train":
        world_size = launch.nproc_per_node * launch.nnodes
        report = stage_module.make_tokenize_report(name, cfg, gpu_memory, device_type, vq_model) if stage == "tokenize" else \
            stage_module.make_negatives_report(name, cfg, world_size, gpu_memory, device_type, vq_model) \
            if stage == "negatives" else stage_module.make_eval_report(name, cfg, world_size, gpu_memory, device_type, vq_model)
        click.echo(stage_module.format_stage_report(report))
    else:
        grid = _planned_grid(ctx, base, name, tokens or subcommand_option(arguments, "--tokens"), vq_model)
        report = stage_module.make_report(name, cfg, launch.nproc_per_node * launch.nnodes, gpu_memory,
                                          (strategy,) if strategy else ("ddp", "fsdp"), device_type, grid=grid)
        click.echo(stage_module.format_report(report))
    from .params import settings_yaml

    where = f"as dvc.yaml's stage {found[0]!r} runs it" if found else "as `cca-pipe config` resolves them"
    click.echo(f"\n# the {stage} settings planned for ({where}):")
    click.echo(settings_yaml({STAGES[stage][2]: cfg}, name), nl=False)


def _plan_settings(ctx: click.Context, stage: str):
    """A stage's settings as the stage resolves them (resolved_config); without a params file, the defaults <-
    --preset <- --set (plan needs none to plan a preset)."""
    if Path(ctx.obj["params"]).is_file():
        return resolved_config(ctx, stage)

    module, cls, section = STAGES[stage]
    overrides = parse_overrides(ctx.obj["overrides"], {}, ctx.obj["params"])
    return build(getattr(verb(module), cls), {}, section, ctx.obj["preset"], overrides)


def _planned_grid(ctx: click.Context, base: dict, name: str, tokens: str | None, vq_model: str | None):
    """(tokens per side of the images train will see, where that comes from), or None for the preset's: the token
    store's own grid when it exists; before it does, the grid the folder's dvc.yaml tokenize stage will write
    (its tokenize.image_size over its tokenizer's downsampling)."""
    from pipeline.tokenstore import store_attrs

    stage_module = verb("plan")
    from .dvcstage import subcommand_option

    attrs = store_attrs(Path(tokens)) if tokens else None
    if attrs and attrs.get("grid"):
        return int(attrs["grid"]), f"the token store {tokens}"
    tokenize_ctx = click.Context(ctx.command, obj=dict(base))
    found = as_dvc_stage(tokenize_ctx, "tokenize") if Path(base["params"]).is_file() else None
    if not found:
        return None
    cfg = _plan_settings(tokenize_ctx, "tokenize")
    family = stage_module.model_description(name)["family"]
    downsample = stage_module.conv_tokenizer_for(family, subcommand_option(found[2], "--vq-model") or vq_model).downsample
    return cfg.image_size // downsample, f"dvc.yaml's stage {found[0]!r}: tokenize.image_size {cfg.image_size} / {downsample}"


@main.command()
@click.argument("path", type=PathType)
@click.option("--verify", is_flag=True, help="token stores: read every chunk (checksums) and recompute the fingerprint")
def info(path, verify):
    """Print what a token store, reference cache, checkpoint, sample batch (.npz) or eval folder holds."""
    click.echo(verb("info").describe(path, verify))


@main.command("upgrade-store")
@click.argument("path", type=PathType)
def upgrade_store(path):
    """Rewrite a token store of an earlier format in the current one, in place (tokens copied, never
    re-encoded; same fingerprint, so caches made from it stay valid)."""
    from pipeline.tokenstore import upgrade_token_store

    click.echo(f"{path}: format upgraded, fingerprint {upgrade_token_store(path)}")


@main.command()
@click.argument("path", default="data/report/results.md", type=PathType)
def results(path):
    """Print a results table: a report's results.md, or an eval's metrics.json."""
    from pipeline.evaluation import format_results

    read_results = verb("report").read_results
    if not path.is_file():
        raise click.ClickException(f"{path} not found: run `dvc repro` first")
    if path.suffix == ".json":
        click.echo(format_results(read_results(path, ("methods", "checks", "seeds", "samples_per_method"))))
    else:
        click.echo(path.read_text(encoding="utf-8"))


@main.command()
@click.option("--eval", "eval_dir", default="data/eval", type=PathType, show_default=True)
@click.option("--train", "train_dir", default="data/train", type=PathType, show_default=True)
@click.option("--sweep", "sweep_dir", default="data/sweep", type=PathType, show_default=True)
@click.option("--runs", "runs_path", default=None, type=PathType,
              help="the recorded runs whose CCA / best CFG range this run is compared with (default: the repository's, docs/)")
@click.pass_context
def verdict(ctx, eval_dir, train_dir, sweep_dir, runs_path):
    """One line: the main CCA policy's FID against the best CFG scale's and the base model's, and whether the
    ratio lies in the range of the recorded runs (docs/paper.md): `make demo` ends with it."""
    stage = verb("report")
    click.echo(stage.verdict(eval_dir, train_dir, sweep_dir, resolved_config(ctx, "report"), runs_path))


MAX_MESSAGE = 2000  # characters: a message quoting a value (an expanded YAML alias) is cut, never megabytes


def _fail(message: str) -> None:
    """One line on stderr (whatever the message's own line breaks, at most MAX_MESSAGE characters), exit status 2."""
    text = " ".join(str(message).split())
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]} ... (cut: {len(text)} characters; -v shows the whole error)"
    click.echo("cca-pipe: error: " + text, err=True)
    sys.exit(2)


def _disk_full(e: OSError) -> str:
    """Which file could not be written, on which disk, and how much space that disk has left."""
    import shutil

    target = Path(e.filename) if e.filename else None
    folder = target.parent if target is not None else None
    try:
        free = f"; {shutil.disk_usage(folder).free / 1e9:.2f} GB free there now" if folder is not None else ""
    except OSError:
        free = ""
    where = f"the disk holding {folder} is full" if folder is not None else "the disk is full"
    return (f"cannot write {target or 'an output file'}: {where} ({e.strerror}{free}). Free space on it, or write to "
            "another disk (--out), then rerun.")


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _leave_it_to_rank_zero(wait_s: float = 60.0) -> None:
    """A JobError on a rank but 0: rank 0 raises the same and reports it. Exiting now could end the job (torchrun
    stops every rank once one fails) before rank 0 has said why, so wait for torchrun to stop this process (or
    exit quietly after `wait_s`)."""
    import time

    time.sleep(wait_s)
    sys.exit(2)


def known_errors() -> tuple[type[BaseException], ...]:
    """The input errors guarded() turns into one line, looked up when one is raised (an `except` clause is evaluated
    then). ConfigError, CheckpointError, FormatError and OutputError are ValueErrors; OutOfMemory (a RuntimeError)
    exists only once pipeline.device, which imports torch, was imported: importing it up front would put torch
    (1.5 s of a core) into the commands that need none (fetch, report, --help)."""
    device = sys.modules.get("pipeline.device")
    return (ValueError, FileNotFoundError, FloatingPointError, *((device.OutOfMemory,) if device else ()))


@contextlib.contextmanager
def guarded():
    """Known input errors become one clear message and exit status 2 (with -v, the traceback too); under
    torchrun each rank reports its own."""
    import errno

    verbose = "-v" in sys.argv[1:] or "--verbose" in sys.argv[1:]
    try:
        yield
    except known_errors() as e:
        from pipeline.config import JobError
        from pipeline.ranks import rank_zero

        if verbose:
            raise
        if isinstance(e, JobError) and not rank_zero():
            _leave_it_to_rank_zero()
        _fail(str(e))
    except RuntimeError as e:  # after OutOfMemory (above)
        from pipeline.ranks import launched

        text = str(e).lower()
        if verbose or not launched() or not any(s in text for s in ("timed out", "connection closed by peer",
                                                                    "connection reset by peer")):
            raise
        if "timed out" not in text:  # a process of the job ended first, and said why (or, killed, stages.cli.launch does)
            if os.environ.get(QUIET_PEERS) == "1":
                # after torchrun's agent has seen the process that ended first (it polls every 0.1 s): the launcher
                # names a rank killed by a signal (stages.cli.launch torchrun_main), which a rank that ended here as
                # soon as its connection closed could otherwise precede (this process ends in milliseconds)
                import time

                time.sleep(1)
                sys.exit(2)
            _fail(f"rank {os.environ.get('RANK', '?')}: another process of the job ended while this one waited for it "
                  f"({_first_line(e)[:200]}): see its message above; the job stops uncommitted, rerun to resume")
        _fail(f"rank {os.environ.get('RANK', '?')} of the job waited "
              f"{os.environ.get('CCA_PIPE_DIST_TIMEOUT_S', '1800')} s (CCA_PIPE_DIST_TIMEOUT_S) for another process, which "
              "stopped answering (stopped with SIGSTOP or Ctrl-Z, hung, or its node went away): the job stops "
              f"uncommitted; rerun the command to resume ({_first_line(e)[:200]})")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT) or verbose:
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail(_disk_full(e))
        _fail(f"cannot write {e.filename or 'an output file'}: {e.strerror}. "
              "Choose a writable output location (--out) or free disk space, then rerun.")


def run() -> None:
    """The command line's entry: `cca-pipe` with sys.argv (the console script runs it through `run_process`)."""
    from pipeline.host import use_huge_pages

    use_huge_pages()  # before torch is imported: c10 reads it once
    with guarded():
        main(standalone_mode=True)


def run_process() -> None:
    """Console-script entry (`cca-pipe`, pyproject.toml), and each torchrun rank's (`python -m stages.cli.main`): `run`,
    then the end of the process without its teardown (exit_without_teardown). `run` itself ends in SystemExit, as a
    caller in the same process (a test, a script) expects."""
    try:
        run()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):  # a message (sys.exit("...")) is Python's to print
            exit_without_teardown(int(e.code or 0))
        raise
    exit_without_teardown(0)


if __name__ == "__main__":  # `python -m stages.cli.main`: how torchrun runs each process
    run_process()
