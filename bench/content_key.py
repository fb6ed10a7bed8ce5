"""Benchmark: the cost of keying tokenize by image contents (issue 21), and its estimate at ImageNet scale.

    python bench/content_key.py          # 4,000 files of 110 KB; prints a table, writes bench/results/content_key.json
    python bench/content_key.py --quick  # 400 files (content_key_quick.json)

Two costs, per file (ImageNet's train JPEGs average about 110 KB):
  hash   a first run: open, fstat, read and sha256 each file (pipeline.images.read_image_file and
         content_digest, what tokenize's loader does with the bytes it decodes anyway, so on a first run
         this is the only extra cost: the sha256, the read is shared with decoding);
  stat   an unchanged rerun: read the store's input record (inputs/<chunk>.json, 512 files a chunk) and
         one stat() per image (pipeline.tokenstore.read_input_record + known_inputs), no read of any image.
The files are freshly written, so they are read from the page cache: the hash row is the CPU cost; a
cold first run is bounded by the disk instead (1.28M x 110 KB = 141 GB), as decoding them is anyway.
MFU: n/a (no model FLOPs).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import parse_args, table, write_results  # noqa: E402
from pipeline.images import content_digest, read_image_file  # noqa: E402
from pipeline.outputs import write_json  # noqa: E402
from pipeline.tokenstore import INPUTS_DIR, chunk_inputs_digest, input_file, known_inputs, read_input_record  # noqa: E402

FILE_BYTES = 110_000  # ImageNet train JPEGs: about 110 KB on average
IMAGENET_FILES = 1_281_167
CHUNK_ROWS = 512  # tokenize.chunk_rows' default: one record file per chunk


def make_tree(root: Path, files: int) -> tuple[list[Path], list[str]]:
    """`files` files of FILE_BYTES random bytes in 10 class folders (ImageNet's layout; hashing reads bytes,
    it does not decode, so they need not be JPEGs)."""
    rng = np.random.default_rng(0)
    paths, names = [], []
    for i in range(files):
        name = f"n{i % 10:08d}/{i:07d}.JPEG"
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(FILE_BYTES))
        paths.append(path)
        names.append(name)
    return paths, names


def hash_all(paths: list[Path], names: list[str]) -> list[tuple]:
    inputs = []
    for path, name in zip(paths, names):
        data, key = read_image_file(path)
        inputs.append(input_file(name, key, content_digest(data)))
    return inputs


def write_record(store: Path, inputs: list[tuple]) -> None:
    for k, start in enumerate(range(0, len(inputs), CHUNK_ROWS)):
        files = inputs[start : start + CHUNK_ROWS]
        write_json(store / INPUTS_DIR / f"{k}.json", {"digest": chunk_inputs_digest(files), "files": [list(f) for f in files]})


def main(args) -> dict:
    files = 400 if args.quick else 4000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, names = make_tree(tmp, files)
        start = time.perf_counter()
        inputs = hash_all(paths, names)
        hash_s = time.perf_counter() - start
        write_record(tmp / "store", inputs)
        start = time.perf_counter()
        known = known_inputs(paths, names, read_input_record(tmp / "store"))
        stat_s = time.perf_counter() - start
        assert known == inputs, "an unchanged tree must be known from stat() alone"
    results = {"files": files, "file_bytes": FILE_BYTES, "imagenet_files": IMAGENET_FILES, "mfu": None}
    for name, seconds in (("hash", hash_s), ("stat", stat_s)):
        rate = files / seconds
        results[name] = {"seconds": seconds, "files_per_s": rate, "mb_per_s": rate * FILE_BYTES / 1e6,
                         "imagenet_estimate_s": IMAGENET_FILES / rate}
    rows = [["first run: read + sha256 (page cache)", f"{results['hash']['files_per_s']:,.0f}",
             f"{results['hash']['mb_per_s']:,.0f}", f"{results['hash']['imagenet_estimate_s'] / 60:,.1f} min"],
            ["unchanged rerun: record + stat()", f"{results['stat']['files_per_s']:,.0f}", "-",
             f"{results['stat']['imagenet_estimate_s']:,.1f} s"]]
    print(f"content keys of {files} files of {FILE_BYTES / 1e3:.0f} KB, one process; estimate for "
          f"{IMAGENET_FILES:,} ImageNet train JPEGs; MFU n/a (no model FLOPs)")
    print(table(rows, ["what", "files/s", "MB/s", "1.28M files"]))
    write_results("content_key", results, "cpu", args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
