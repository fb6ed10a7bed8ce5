"""Checkpoints by Hub id (pipeline/hub.py) from a local Hub cache in huggingface_hub's layout (tests/hubcache.py),
offline, and `cca-pipe export` (stages/export.py): a policy as a Hub-ready folder that loads into the peer's class."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import TINY_GPT
from hubcache import add_file, commit_of, offline_env
from peers import ModelArgs, llamagen_transformer, var_hf
from safetensors.torch import load_file as load_safetensors
from worlds import invoke

from pipeline import hub
from pipeline.checkpoint import CheckpointError, load_file
from pipeline.families import LLAMAGEN
from pipeline.families import VAR as VAR_FAMILY
from pipeline.loaders import load_gpt, load_var
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR, VARConfig
from stages import export
from stages.cli.params import save_settings
from stages.train import TrainConfig, save_policy

REPO = "FoundationVision/LlamaGen"


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An offline process whose Hub cache is tmp_path/home/hub (nothing resolved before)."""
    home = tmp_path / "home"
    for key, value in offline_env(home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(home))
    hub.forget()
    yield home / "hub"
    hub.forget()


def _serve(cache, tmp_path, name="c2i_L_384.pt", data=b"weights", commit=None, repo=REPO):
    source = tmp_path / f"src-{name}"
    source.write_bytes(data)
    commit = commit or commit_of(repo, name)
    return add_file(cache, repo, name, source, commit), commit


# ---------------------------------------------------------------------------------------------- references


def test_parse_reads_repo_file_and_revision():
    assert hub.parse("hf://FoundationVision/LlamaGen/c2i_L_384.pt") == hub.HubRef(REPO, "c2i_L_384.pt", None)
    assert hub.parse("hf://ChenDRAG/CCA_VAR/sub/dir/var_d16.pth@v1.0") == hub.HubRef("ChenDRAG/CCA_VAR", "sub/dir/var_d16.pth", "v1.0")
    for bad in ("hf://FoundationVision/c2i_L_384.pt", "hf://a//b/c.pt", "hf://a/b/c.pt@", "hf://a/b/../c.pt", "/local/c.pt"):
        with pytest.raises(hub.HubError) as e:
            hub.parse(bad)
        assert "\n" not in str(e.value) and bad in str(e.value)


def test_a_branch_and_a_commit_resolve_to_the_snapshot_offline(hub_home, tmp_path):
    link, commit = _serve(hub_home, tmp_path)
    for text in (f"hf://{REPO}/c2i_L_384.pt", f"hf://{REPO}/c2i_L_384.pt@main", f"hf://{REPO}/c2i_L_384.pt@{commit}"):
        resolved = hub.resolve(text)
        assert resolved.path == link and resolved.path.read_bytes() == b"weights"
        assert resolved.commit == commit and resolved.record()["repo"] == REPO and resolved.record()["file"] == "c2i_L_384.pt"
    assert hub.resolve(f"hf://{REPO}/c2i_L_384.pt@{commit}").record()["revision"] == commit
    assert hub.resolve(f"hf://{REPO}/c2i_L_384.pt").record()["revision"] == "main"
    assert hub.inputs_record(link) == [{"repo": REPO, "file": "c2i_L_384.pt", "revision": "main", "commit": commit}]


def test_a_moved_branch_resolves_to_its_new_commit_and_a_pinned_commit_stays(hub_home, tmp_path):
    _, old = _serve(hub_home, tmp_path, data=b"old", commit=commit_of("old"))
    _, new = _serve(hub_home, tmp_path, data=b"new", commit=commit_of("new"))
    assert hub.resolve(f"hf://{REPO}/c2i_L_384.pt").path.read_bytes() == b"new"
    assert hub.resolve(f"hf://{REPO}/c2i_L_384.pt@{old}").path.read_bytes() == b"old"


def test_a_cold_cache_a_missing_revision_and_a_missing_file_are_one_line_each(hub_home, tmp_path):
    _serve(hub_home, tmp_path)
    cases = {
        "hf://ChenDRAG/CCA_LlamaGen/c2i_L_384.pt": ("not in the local Hub cache", "huggingface-cli download ChenDRAG/CCA_LlamaGen c2i_L_384.pt"),
        f"hf://{REPO}/c2i_L_384.pt@v9": ("no revision 'v9'", f"huggingface-cli download {REPO} c2i_L_384.pt --revision v9"),
        f"hf://{REPO}/c2i_XL_384.pt": ("holds no file 'c2i_XL_384.pt'", f"huggingface-cli download {REPO} c2i_XL_384.pt"),
    }
    for text, (what, fix) in cases.items():
        with pytest.raises(hub.HubError) as e:
            hub.resolve(text)
        message = str(e.value)
        assert "\n" not in message and what in message and fix in message and "HF_HUB_OFFLINE" in message


def test_a_repo_without_access_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    for error, what in ((GatedRepoError, "gated"), (RepositoryNotFoundError, "private")):
        def refuse(*args, error=error, **kwargs):
            e = error.__new__(error)
            Exception.__init__(e, "401 Client Error")
            raise e

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
        with pytest.raises(hub.HubError) as e:
            hub.resolve("hf://ChenDRAG/CCA_VAR/var_d16.pth")
        assert "\n" not in str(e.value) and what in str(e.value) and "huggingface-cli login" in str(e.value)


def test_the_command_line_says_a_cold_cache_in_one_line(hub_home, tmp_path, monkeypatch, capsys):
    code, err = invoke(["train", "--init", f"hf://{REPO}/c2i_L_384.pt", "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("cca-pipe: error: hf://FoundationVision/LlamaGen/c2i_L_384.pt") and "huggingface-cli download" in err
    assert not (tmp_path / "out").exists()


class _Boom:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_from_the_hub_is_read_weights_only(hub_home, tmp_path, capsys):
    """The file is loaded as a local one (pipeline.checkpoint.load_file): code in a pickle is refused, not run."""
    source = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Boom()}, source, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    add_file(hub_home, REPO, "evil.pt", source, commit_of("evil"))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_file(hub.local_path(f"hf://{REPO}/evil.pt"))
    assert "pickled code ran" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- export


def _run_folder(tmp_path, hub_home, family, model, metrics=True):
    """A train output folder as `cca-pipe train` leaves it (its own save_policy and save_settings): the base served
    from the Hub cache and resolved (so recorded), the policy the base with its weights moved."""
    base = tmp_path / "base.pt"
    family.save(base, model)
    add_file(hub_home, REPO, "base.pt", base, commit_of("base"))
    init = hub.local_path(f"hf://{REPO}/base.pt@main")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    run = tmp_path / "run" / "train"
    run.mkdir(parents=True)
    cfg = TrainConfig()
    save_policy(run / "policy.pt", model, model.state_dict(), cfg, "sha-of-init", 12, None)
    save_settings(run, "train", cfg)
    if metrics:
        (run / "metrics.json").write_text(json.dumps({"steps": 12, "final": {"loss": 0.6931, "rewards/accuracy": 0.75}}))
        (run.parent / "eval").mkdir()
        (run.parent / "eval" / "metrics.json").write_text(json.dumps({"methods": {"cca": {"fid": 12.5, "is": 88.0}}}))
    return run, init


def test_export_of_a_llamagen_policy_loads_into_gpt_with_equal_logits(hub_home, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    run, _ = _run_folder(tmp_path, hub_home, LLAMAGEN, GPT(GPTConfig(**TINY_GPT)))
    code, err = invoke(["export", run, "--out", tmp_path / "hub-folder"], monkeypatch, capsys)
    assert code == 0, err
    out = tmp_path / "hub-folder"
    config = json.loads((out / "config.json").read_text())
    assert config["n_kv_head"] == config["n_head"] and config["class_dropout_prob"] > 0 and config["model_type"] == "c2i"
    peer = llamagen_transformer(ModelArgs(**config)).eval()  # the peer's own field names: any other is a TypeError
    peer.load_state_dict(load_safetensors(str(out / "model.safetensors")), strict=True)
    policy = load_gpt(run / "policy.pt").eval()
    labels, tokens = torch.tensor([1, 4, 5]), torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(peer.logits(labels, tokens), policy.logits(labels, tokens), rtol=0, atol=0)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {REPO}" in front and "library_name: cca-pipe" in front and "llamagen" in front
    assert f"at commit `{commit_of('base')}`" in card and "(revision `main`)" in card  # base and its revision
    assert "lambda:" in card and "beta:" in card  # the settings, as params.yaml spells them
    assert "loss 0.6931" in card and '"fid": 12.5' in card  # train's and eval's metrics
    assert f"train --init hf://{REPO}/base.pt@{commit_of('base')}" in card  # the reproducing command, pinned


def test_export_of_a_var_policy_loads_into_var_with_equal_logits(hub_home, tmp_path):
    from test_var import TINY_VAE, TINY_VAR

    from pipeline.models.var import VARModel
    from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel

    torch.manual_seed(0)
    model = VARModel(VAR(VARConfig(**TINY_VAR)), MSVQModel(MSVQConfig(**TINY_VAE)).quantize)
    run, _ = _run_folder(tmp_path, hub_home, VAR_FAMILY, model, metrics=False)
    out = export.run(run, tmp_path / "hub-folder")
    config = json.loads((out / "config.json").read_text())
    assert (config["embed_dim"], config["num_heads"], config["depth"]) == (TINY_VAR["width"], TINY_VAR["heads"], TINY_VAR["depth"])
    assert config["vae_kwargs"]["z_channels"] == TINY_VAR["cvae"] and config["attn_l2_norm"] and not config["shared_aln"]
    peer = var_hf(**config).eval()  # VARHF's own parameter names: any other is a TypeError
    peer.load_state_dict(load_safetensors(str(out / "model.safetensors")), strict=True)
    policy = load_var(run / "policy.pt").eval()
    g = torch.Generator().manual_seed(3)
    labels, teacher = torch.tensor([0, 4]), torch.randn(2, peer.cfg.seq_len - 1, TINY_VAR["cvae"], generator=g)
    with torch.no_grad():
        torch.testing.assert_close(peer(labels, teacher), policy(labels, teacher), rtol=0, atol=0)
        assert not torch.equal(peer(labels, teacher), VAR(VARConfig(**TINY_VAR)).eval()(labels, teacher))
    card = (out / "README.md").read_text()
    assert "base_model: FoundationVision/LlamaGen" in card and "var" in card.split("---")[1]
    assert "- none recorded" in card  # no metrics: the card says so rather than inventing them


def test_export_refuses_a_lambda_conditioned_policy_in_one_line(hub_home, tmp_path, monkeypatch, capsys):
    """Its lambda_embed weights have no place in the peer's class: no config.json could load it there."""
    torch.manual_seed(0)
    run, _ = _run_folder(tmp_path, hub_home, LLAMAGEN, GPT(GPTConfig(**TINY_GPT, lambda_conditioning=True)), metrics=False)
    code, err = invoke(["export", run, "--out", tmp_path / "hub-folder"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lambda-conditioned" in err and "ModelArgs" in err
    assert not (tmp_path / "hub-folder").exists()


def test_export_refuses_a_folder_without_a_policy(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    code, err = invoke(["export", tmp_path / "run", "--out", tmp_path / "x"], monkeypatch, capsys)
    assert code == 2 and "policy.pt not found" in err and len(err.strip().splitlines()) == 1


def test_safetensors_are_preferred_where_the_repo_has_them(hub_home, tmp_path):
    commit = commit_of("both")
    _serve(hub_home, tmp_path, name="c2i_L_384.pt", data=b"pickle", commit=commit)
    _serve(hub_home, tmp_path, name="c2i_L_384.safetensors", data=b"tensors", commit=commit)
    _serve(hub_home, tmp_path, name="vq_ds16_c2i.pt", data=b"only a pickle", commit=commit)
    both = hub.resolve(f"hf://{REPO}/c2i_L_384.pt@{commit}")
    assert both.path.read_bytes() == b"tensors" and both.record()["file"] == "c2i_L_384.safetensors"
    only = hub.resolve(f"hf://{REPO}/vq_ds16_c2i.pt@{commit}")
    assert only.path.read_bytes() == b"only a pickle" and only.record()["file"] == "vq_ds16_c2i.pt"


# ---------------------------------------------------------------------------------------------- fetch


def test_fetch_links_local_files_and_pinned_hub_files(hub_home, tmp_path, monkeypatch, capsys):
    link, commit = _serve(hub_home, tmp_path)
    local = tmp_path / "vq.pt"
    local.write_bytes(b"vq")
    out = tmp_path / "data" / "checkpoints"
    code, err = invoke(["fetch", "--pinned", f"vq_ckpt={local}", f"gpt_ckpt=hf://{REPO}/c2i_L_384.pt@{commit}", "--out", out],
                       monkeypatch, capsys)
    assert code == 0, err
    assert (out / "vq_ckpt").readlink() == local and (out / "gpt_ckpt").readlink() == link
    assert (out / "gpt_ckpt").read_bytes() == b"weights"


def test_fetch_pinned_refuses_a_branch_naming_the_commit_to_pin(hub_home, tmp_path, monkeypatch, capsys):
    _, commit = _serve(hub_home, tmp_path)
    out = tmp_path / "checkpoints"
    for ref in (f"hf://{REPO}/c2i_L_384.pt", f"hf://{REPO}/c2i_L_384.pt@main"):
        code, err = invoke(["fetch", "--pinned", f"gpt_ckpt={ref}", "--out", out], monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"gpt_ckpt = {ref}: not pinned" in err and f"write hf://{REPO}/c2i_L_384.pt@{commit} in params.yaml" in err
    code, err = invoke(["fetch", "--pinned", f"gpt_ckpt={tmp_path / 'nowhere.pt'}", "--out", out], monkeypatch, capsys)
    assert code == 2 and "gpt_ckpt = " in err and "not found: fix the path in params.yaml" in err
    assert not out.exists()  # nothing linked when an input is wrong


# ---------------------------------------------------------------------------------- eval's and score's other files


def test_score_reads_the_reference_batch_and_classifier_by_hub_id_and_records_their_commits(hub_home, tmp_path, monkeypatch,
                                                                                           capsys):
    """The same score by local paths and by Hub ids (each with its own feature cache, so nothing is reused): equal
    scores; --json names the commit of each Hub file read, once each (the classifier is also the extractor)."""
    import numpy as np
    from test_sample_files import CLASSES, ROOT

    from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=CLASSES, feature_dim=8)).eval())
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8),
             arr_1=np.arange(10, dtype=np.int64) % CLASSES)
    served = {"ref.npz": "openai/adm-reference", "clf.pt": "someone/digits-classifier"}
    ids = {}
    for name, repo in served.items():
        add_file(hub_home, repo, name, tmp_path / name, commit_of(repo, name))
        ids[name] = f"hf://{repo}/{name}@{commit_of(repo, name)}"
    results = {}
    for how, ref, clf in (("path", tmp_path / "ref.npz", tmp_path / "clf.pt"), ("hub", ids["ref.npz"], ids["clf.pt"])):
        code, err = invoke(["--params", ROOT / "params.yaml", "score", tmp_path / "samples.npz", "--reference", ref,
                            "--classifier", clf, "--fidelity-cache", tmp_path / f"fc-{how}", "--json", tmp_path / f"{how}.json"],
                           monkeypatch, capsys)
        assert code == 0, err
        results[how] = json.loads((tmp_path / f"{how}.json").read_text())
    assert results["hub"]["scores"] == results["path"]["scores"] and "class_accuracy" in results["hub"]["scores"]
    assert "hub_inputs" not in results["path"]
    assert results["hub"]["hub_inputs"] == [
        {"repo": repo, "file": name, "revision": commit_of(repo, name), "commit": commit_of(repo, name)}
        for name, repo in served.items()]


def test_eval_inception_weights_take_a_hub_id(hub_home, tmp_path):
    """eval.inception_weights by Hub id is the file of the pinned snapshot, recorded as every Hub input is; not in the
    cache, one line naming the repo, the file and the command that fetches it."""
    from pipeline.evaluation import scorer_weights
    from stages.eval import EvalConfig

    name, repo = "weights-inception-2015-12-05-6726825d.pth", "someone/fid-inception"
    link, commit = _serve(hub_home, tmp_path, name=name, data=b"inception", repo=repo)
    settings = EvalConfig(feature_extractor="inception-v3-compat", inception_weights=f"hf://{repo}/{name}@{commit}")
    weights = scorer_weights(settings, None)
    assert weights == link and weights.read_bytes() == b"inception"
    assert hub.inputs_record(weights) == [{"repo": repo, "file": name, "revision": commit, "commit": commit}]
    cold = EvalConfig(feature_extractor="inception-v3-compat", inception_weights=f"hf://{repo}/other.pth@{commit}")
    with pytest.raises(hub.HubError) as e:
        scorer_weights(cold, None)
    assert "\n" not in str(e.value) and f"huggingface-cli download {repo} other.pth" in str(e.value)


def test_score_says_a_cold_hub_reference_in_one_line(hub_home, tmp_path, monkeypatch, capsys):
    from test_sample_files import ROOT

    missing = f"hf://openai/adm-reference/VIRTUAL_imagenet256_labeled.npz@{commit_of('none')}"
    code, err = invoke(["--params", ROOT / "params.yaml", "score", tmp_path / "samples.npz", "--reference", missing,
                        "--classifier", tmp_path / "clf.pt"], monkeypatch, capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "huggingface-cli download openai/adm-reference VIRTUAL_imagenet256_labeled.npz" in err


def test_fetch_help_and_errors_never_import_torch(tmp_path):
    """fetch runs in every shipped pipeline and only links files: its process (and `--help`, and a refused input's
    one line) starts without torch (1.5 s of a core each; stages/cli/main.py known_errors, pipeline/ranks.py)."""
    import os
    import subprocess
    import sys

    local = tmp_path / "vq.pt"
    local.write_bytes(b"vq")
    code = ("import sys\nfrom stages.cli import run\nsys.argv = ['cca-pipe', *sys.argv[1:]]\ntry:\n    run()\n"
            "finally:\n    print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    out = tmp_path / "data" / "checkpoints"
    for args, status in ((["--help"], 0), (["fetch", "--help"], 0), (["fetch", f"vq_ckpt={local}", "--out", str(out)], 0),
                         (["fetch", "--pinned", "gpt_ckpt=hf://owner/repo/gpt.pt", "--out", str(out)], 2)):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
        assert proc.returncode == status and proc.stderr.rstrip().endswith("no torch"), (args, proc.stderr[-2000:])
    assert (out / "vq_ckpt").readlink() == local
