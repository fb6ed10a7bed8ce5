"""The model that reads a token store's rows: reflogp's reference and train's policy load it the same way."""

from __future__ import annotations

from pathlib import Path

from pipeline.distributed import World
from pipeline.families import FamilyContract, Model, ModelSource, load_model
from pipeline.parallel import place
from pipeline.tokenstore import TokenStore

from . import presets


def load_for_store(path: Path, role: str, store: TokenStore, tokens_path: Path, world: World, strategy: str,
                   source: ModelSource) -> tuple[FamilyContract, Model]:
    """Loaded with the store's token layout (its attributes), placed for `strategy`, checked against the store
    and `source`'s preset. Rank 0 also checks every chunk: the other ranks stop with it if one is damaged."""
    family, model = load_model(path, role, source, layout=store.attrs)
    model = place(model, world, strategy)
    family.check_fits(model, store.attrs, tokens_path, path)
    if world.main:
        store.check_chunks()
    presets.check_model(source.preset, family.name, model.cfg)
    return family, model
