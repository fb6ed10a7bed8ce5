"""The family object is whole: the shipped families' models keep the model contract (pipeline.families.Model),
and a third family defined in tests/toy_family.py, registered through $CCA_PIPE_FAMILIES alone, runs
tokenize -> reflogp -> train -> eval end to end with no line of pipeline/ or stages/ knowing it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.checkpoint import save_checkpoint
from pipeline.families import LLAMAGEN, VAR, FamilyContract, Model, ModelConfig, Tokenizer, families, family_named
from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "toy_family"  # tests/ is on sys.path (pytest's rootdir conftest)


@pytest.fixture
def toy_plugin(monkeypatch):
    """The toy family registered the way a user's plugin is: $CCA_PIPE_FAMILIES names its module, which the
    registry imports on its first lookup; forgotten afterwards, so other tests see the shipped families only."""
    from pipeline.families import FAMILIES, unregister_family

    assert "toy" not in families() and PLUGIN not in sys.modules
    monkeypatch.setenv("CCA_PIPE_FAMILIES", PLUGIN)
    yield
    if "toy" in FAMILIES:  # the registry as it is (a lookup would import the plugins of the environment again)
        unregister_family("toy")
    sys.modules.pop(PLUGIN, None)


def _tiny_llamagen():
    from pipeline.models.llamagen import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, dim=16, num_classes=3, block_size=16))


def _tiny_var():
    from pipeline.models.memory import build_var

    return build_var(2, patch_nums=(1, 2), vocab_size=32, num_classes=3)


@pytest.mark.parametrize("build", [_tiny_llamagen, _tiny_var], ids=["llamagen", "var"])
def test_shipped_models_keep_the_model_contract(build):
    """Both families' models satisfy the Protocol (every member there) and behave as it says: forward gives
    (B, L) float32 log-probs (<= 0, the log of a distribution over the vocabulary at each position)."""
    torch.manual_seed(0)
    model = build().eval()
    assert isinstance(model, Model) and isinstance(model.cfg, ModelConfig)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    labels = torch.tensor([0, 1, cfg.null_class])
    with torch.no_grad():
        logp = model(tokens, labels)
    assert logp.shape == (3, cfg.seq_len) and logp.dtype == torch.float32
    assert bool((logp <= 0).all()) and bool(torch.isfinite(logp).all())
    # the first token's log-probs over every code sum to 1 in probability: a distribution, not a score
    first = torch.stack([model(torch.full((1, cfg.seq_len), v), labels[:1])[0, 0] for v in range(cfg.vocab_size)])
    assert float(torch.logsumexp(first.detach(), 0)) == pytest.approx(0.0, abs=1e-4)
    upstream = model.upstream_state_dict()  # the peer's own keys (VAR's without its quantiser)
    assert len(model.blocks()) >= 1 and upstream and len(upstream) <= len(model.state_dict())


def test_shipped_families_keep_the_family_contract():
    for family in (LLAMAGEN, VAR):
        assert isinstance(family, FamilyContract)
        assert isinstance(family.build_tokenizer(), Tokenizer)
        assert family_named(family.name) is family


def test_the_toy_model_keeps_the_model_contract(toy_plugin):
    import toy_family

    model = toy_family.ToyModel(toy_family.ToyConfig(seq_len=4, vocab_size=8)).eval()
    assert isinstance(model, Model) and isinstance(family_named("toy"), FamilyContract)
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    logp = model(tokens, torch.tensor([0, 0]))
    assert logp.shape == (2, 4) and logp.dtype == torch.float32
    # causal: changing the last token changes its own log-prob only
    assert torch.equal(logp[0, :3], logp[1, :3]) and logp[0, 3] != logp[1, 3]


def test_the_environment_variable_registers_a_plugin(toy_plugin, monkeypatch):
    assert "toy" in families() and PLUGIN in sys.modules  # the lookup imported it
    monkeypatch.setenv("CCA_PIPE_FAMILIES", "no_such_family_module")
    with pytest.raises(ValueError, match="CCA_PIPE_FAMILIES names the family plugin 'no_such_family_module'"):
        families()


def test_the_toy_family_is_planned_through_its_own_object(toy_plugin):
    """`cca-pipe plan`'s numbers come from the family object (ToyFamily.memory, in tests/toy_family.py): the
    planner builds the model from its description and counts its activations with no line of its own about it.
    C = 32, L = 8, V = 8, 3 rows = 6 sequences x 8 positions = 48 tokens, CPU float32.
    Parameters: classes (2 + null) x 32 = 96, tokens 8 x 32 = 256, positions 8 x 32 = 256, the block's Linear
    32 x 32 + 32 = 1056, head 32 x 8 + 8 = 264: P = 1928, of which 872 outside the block.
    Kept: the block's Linear input and Tanh output 2 x 32 x 4 = 256 B per token; the root's head input 128, gather
    index 8, log-sum-exp 4 = 140 B per token: (256 + 140) x 48 = 19008. Logits 4 x 48 x 8 x 4 = 6144.
    Autograd saves those, the float32 logits once (48 x 8 x 4 = 1536) and what the plan leaves out: the labels
    (6 x 8 B) and the prefix mean's int64 divisor (7 x 8 B)."""
    from test_plan import _saved_bytes

    from pipeline.memplan import build_meta, inputs_from_model, plan

    toy = family_named("toy")  # loads the plugin named by the environment
    toy_family = sys.modules[PLUGIN]
    assert toy.memory is toy_family.TOY_MEMORY
    model = build_meta("toy", "cpu", seq_len=8, dim=32, vocab_size=8)
    assert isinstance(model, toy_family.ToyModel) and model.cfg.dim == 32
    inputs = inputs_from_model(model, 3, device="cpu")
    assert (inputs.params_total, inputs.params_root, inputs.layers, inputs.positions) == (1928, 872, 1, 8)
    p = plan(inputs)
    assert (p.activations, p.logits) == (19008, 6144)
    model.train()
    tokens, labels = torch.randint(0, 8, (6, 8)), torch.randint(0, 2, (6,))
    assert _saved_bytes(model, tokens, labels) == p.activations + 48 * 8 * 4 + 6 * 8 + 7 * 8
    assert toy.memory.at_grid({"dim": 32, "seq_len": 8}, 5) == {"dim": 32, "seq_len": 5}
    with pytest.raises(ValueError, match="dropout 0.1: a toy model has none"):
        plan(inputs.variant(dropout=0.1))


def test_a_family_without_memory_counts_cannot_be_planned(toy_plugin):
    from pipeline.families import register_family, unregister_family
    from pipeline.memplan import build_meta

    class Unplanned(type(family_named("toy"))):
        name, model_kind, tokenizer_kind = "unplanned", "unplanned-ar", "unplanned-strips"
        memory = None

    register_family(Unplanned())
    try:
        with pytest.raises(ValueError, match="model family 'unplanned' gives cca-pipe plan no memory counts: set its "
                                             "Family.memory"):
            build_meta("unplanned", seq_len=4)
    finally:
        unregister_family("unplanned")
    with pytest.raises(ValueError, match="'nowhere' is not a registered model family"):
        build_meta("nowhere")


def test_strip_tokenizer_round_trip(toy_plugin):
    """Hand-made golden: a 8 x 8 image of grey levels -1, 1 in two strips of 4 rows, codebook [-1, 1]."""
    import toy_family

    tok = toy_family.StripTokenizer(toy_family.StripConfig(codebook_size=2, strip=4))
    image = torch.cat([torch.full((1, 3, 4, 8), -0.9), torch.full((1, 3, 4, 8), 0.8)], dim=2)
    assert tok.encode(image).tolist() == [[0, 1]]
    decoded = tok.decode_codes(torch.tensor([[0, 1]]))
    assert decoded.shape == (1, 3, 8, 8) and decoded[0, :, :4].eq(-1).all() and decoded[0, :, 4:].eq(1).all()


def test_a_third_family_runs_the_pipeline_end_to_end(toy_plugin, tmp_path, monkeypatch, capsys):
    """tokenize -> reflogp -> train -> eval through the CLI with the toy family, registered by
    $CCA_PIPE_FAMILIES only: every stage finds it through the registry (its checkpoints' kinds, the store's
    family), samples with its sampler, decodes with its tokenizer."""
    from worlds import invoke

    toy = family_named("toy")  # loads the plugin named by the environment: the CLI's lookups find it the same way
    toy_family = sys.modules[PLUGIN]
    rng = np.random.default_rng(0)
    for c in ("dark", "light"):  # the classes differ in brightness, so the strips' codes differ by class
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(4):
            base = 40 if c == "dark" else 200
            pixels = np.clip(base + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    tok = toy_family.StripTokenizer(toy_family.StripConfig(codebook_size=8, strip=4))
    save_checkpoint(tmp_path / "strips.pt", tok.state_dict(), tok.cfg.to_dict(), kind=toy.tokenizer_kind)
    model = toy_family.ToyModel(toy_family.ToyConfig(num_classes=2, vocab_size=8, seq_len=4))
    save_checkpoint(tmp_path / "toy.pt", model.state_dict(), model.cfg.to_dict(), kind=toy.model_kind)
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=2)).eval())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"].update(image_size=16, augment="flip", batch_size=4, chunk_rows=4)
    params["reflogp"].update(views="all", batch_size=4, part_rows=8)
    params["train"].update(epochs=1, batch_size=4, micro_batch_size=2, save_every=0, lr=1e-2)
    params["eval"].update(samples_per_class=2, seeds=[0], cfg_scales=[1.0], batch_size=4, grid_per_class=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = ["--params", tmp_path / "params.yaml"]
    steps = [
        ["tokenize", "--images", tmp_path / "images", "--vq", tmp_path / "strips.pt", "--out", tmp_path / "tokens.zarr"],
        ["reflogp", "--tokens", tmp_path / "tokens.zarr", "--ref", tmp_path / "toy.pt", "--out", tmp_path / "cache.parquet"],
        ["train", "--tokens", tmp_path / "tokens.zarr", "--cache", tmp_path / "cache.parquet", "--init", tmp_path / "toy.pt",
         "--out", tmp_path / "train"],
        ["eval", "--vq", tmp_path / "strips.pt", "--base", tmp_path / "toy.pt", "--policy", tmp_path / "train/policy.pt",
         "--reference", tmp_path / "images", "--classifier", tmp_path / "clf.pt", "--fidelity-cache", tmp_path / "fidelity",
         "--out", tmp_path / "eval"],
    ]
    for argv in steps:
        code, err = invoke([*p, *argv], monkeypatch, capsys)
        assert code == 0, f"{argv[0]}: {err}"

    from pipeline.tokenstore import open_token_store

    store = open_token_store(tmp_path / "tokens.zarr")
    assert store.attrs["family"] == "toy" and store.seq_len == 4 and store.tokens.shape == (8, 2, 4)
    # the tokens are the tokenizer's: the first image's strips, encoded by hand from its pixels
    first = np.asarray(Image.open(sorted((tmp_path / "images" / "dark").glob("*.png"))[0]), np.float64) / 127.5 - 1
    strip_means = first.mean(axis=(1, 2)).reshape(4, 4).mean(1)
    expected = np.abs(strip_means[:, None] - np.linspace(-1, 1, 8)).argmin(1)
    assert store.tokens[0:1][0, 0].tolist() == expected.tolist() == store.tokens[0:1][0, 1].tolist()  # flipped: same strips
    policy = torch.load(tmp_path / "train/policy.pt", weights_only=True)
    assert policy["family"] == "toy-ar" and any(not torch.equal(policy["model"][k], v) for k, v in model.state_dict().items())
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert set(metrics["methods"]) == {"base", "cfg_1", "cca"}  # cfg at eval.cfg_scales [1.0]
    samples = sorted((tmp_path / "eval/samples").glob("*.npz"))
    with np.load(samples[0]) as f:
        images = f["arr_0"]
    # the toy tokenizer's images: 16 x 16, each 4-row strip one grey level (all channels, all columns equal)
    assert images.shape[1:] == (16, 16, 3)
    strips = images.reshape(len(images), 4, 4, 16, 3)
    assert (strips == strips[:, :, :1, :1, :1]).all()

    # without the plugin the store is one clear error naming it and the registration, not a KeyError
    from pipeline.families import unregister_family
    from pipeline.formats import FormatError

    unregister_family("toy")
    monkeypatch.delenv("CCA_PIPE_FAMILIES")
    with pytest.raises(FormatError, match=r"tokens.zarr: token store family 'toy' is not a registered model family .*CCA_PIPE_FAMILIES"):
        open_token_store(tmp_path / "tokens.zarr")


def test_no_shipped_code_knows_the_third_family():
    """The toy family needed no line outside its module and the registry: pipeline/ and stages/ never name it."""
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        text = path.read_text()
        assert "toy_family" not in text and '"toy' not in text and "ToyFamily" not in text, path
