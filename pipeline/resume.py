"""The resumable state of a training run (`TrainState`), written with `torch.distributed.checkpoint` (DCP):
each process writes its own shard, and the state dict is keyed by parameter names, not by the layout of the
processes that wrote it, so a state written by 2 FSDP processes resumes on 1 process, on 4, or with DDP
(pipeline.parallel). DCP's pickled metadata and non-tensor values are read with allow-lists only.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError
from .distributed import World
from .outputs import remove_path, write_json

log = logging.getLogger(__name__)

class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its `.metadata` as a pickle, and FileSystemReader reads it with pickle.load: a planted file
    would run code. This reads it with only the classes DCP's metadata is made of: those defined in
    torch.distributed.checkpoint's own modules (its dataclasses), torch's dtypes and sizes, paths."""

    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        import importlib

        found = None
        if "." not in name and (module == "torch.distributed.checkpoint" or module.startswith("torch.distributed.checkpoint.")):
            candidate = getattr(importlib.import_module(module), name, None)
            if isinstance(candidate, type) and candidate.__module__ == module:  # a class of DCP's, not an import
                found = candidate
        elif (module, name) in self._ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            found = super().find_class(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return found


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Non-tensor values (the optimizer's hyperparameters) are torch.save'd; DefaultLoadPlanner loads them
        with weights_only=False. Plain numbers, strings and tuples load with weights_only=True."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what the parent uses

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes" one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class TrainState:
    """A resume point of a training run: `<directory>/resume.json` (step, data-order RNG, what the stage
    adds: its step log) naming `<directory>/resume-<step>/`, the policy's and optimizer's state written with
    torch.distributed.checkpoint by every process. resume.json is replaced atomically after all processes
    have written their shards, so a kill at any moment leaves the previous complete point; `key` (a digest
    of the settings and inputs) must match for a point to be continued."""

    def __init__(self, directory: Path, key: str, world: World, extra: Callable[[], dict] = dict):
        self.directory, self.key, self.world, self.extra = Path(directory), key, world, extra
        self.index = self.directory / "resume.json"
        self._saved: dict | None | bool = False  # not read yet

    def saved(self) -> dict | None:
        """The saved point for this key ({"step", "rng", "state", ...extra}), or None."""
        if self._saved is False:
            self._saved = self._read()
        return self._saved

    def _read(self) -> dict | None:
        if not self.index.is_file():
            return None
        try:
            saved = json.loads(self.index.read_text(encoding="utf-8"))
            if not isinstance(saved, dict) or not {"key", "step", "rng", "state"} <= set(saved):
                raise ValueError("not a train resume point")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"resume point {self.index} is damaged ({type(e).__name__}: {str(e).split('. ')[0]}): "
                                  f"delete it to restart this run from step 0") from e
        if saved["key"] != self.key:
            log.info("ignoring %s: it belongs to other settings or inputs", self.index)
            return None
        return saved

    def restore(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Load the saved point into the (distributed) policy and its optimizer, whatever the number of
        processes that wrote it; returns its record, or None when there is none to continue."""
        saved = self.saved()
        if saved is None:
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        shards = self.directory / saved["state"]
        model_state, optim_state = get_state_dict(policy, optimizer)  # the layout to load into (this world's)
        state = {"model": model_state, "optimizer": optim_state}
        reader = _safe_reader(shards)
        try:
            reader.read_metadata()  # first, alone: DCP would log a traceback per rank before failing
            with _single_process_quiet():
                dcp.load(state, storage_reader=reader, planner=_safe_planner(), no_dist=self.world.size == 1)
        except Exception as e:  # missing shards, a planted pickle, another model's names
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise CheckpointError(f"resume state {shards} cannot be read ({type(e).__name__}: {(lines or [''])[-1][:300]}): "
                                  f"delete {self.index} to restart this run from step 0") from e
        set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return saved

    def save(self, step: int, policy: nn.Module, optimizer: torch.optim.Optimizer, rng_state: dict) -> None:
        """Every process calls this at the same step; the main process then points resume.json at it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        shards = self.directory / f"resume-{step:07d}"
        if self.world.main:
            remove_path(shards)  # a point a kill left half-written
        self.world.barrier()
        model_state, optim_state = get_state_dict(policy, optimizer)
        with _single_process_quiet():
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=shards, no_dist=self.world.size == 1)
        self.world.barrier()  # every shard is on disk before the point is named
        if self.world.main:
            write_json(self.index, {"key": self.key, "step": step, "rng": rng_state, "state": shards.name, **self.extra()})
            for old in self.directory.glob("resume-*"):
                if old != shards:
                    remove_path(old)
        self._saved = False

    def clear(self) -> None:
        if self.world.main:
            self.index.unlink(missing_ok=True)
            for old in self.directory.glob("resume-*"):
                remove_path(old)
