"""Every CPU gives the same answers: models built and a short run made with
TensorFlow's oneDNN kernels on and off.

TensorFlow turns oneDNN on by default on CPUs with AVX512-VNNI, AVX512-BF16
or AMX and off on AVX2-only ones, and the two kernel sets differ in shape
corners (a batch of 0) and in the last bits. `TF_ENABLE_ONEDNN_OPTS` forces
either, but only before TensorFlow is imported, so each setting runs in a
process of its own: make-model in every format, then a run with each,
float32 (the commands `gbif-embed` runs, one after the other in one process).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import make_sample
from tests.conftest import LOOPBACK, ROOT

FORMATS = ("tf1hub", "tf2", "onnx")


# gbif-embed's `main` on each command line given, in order, in this process.
COMMANDS = ("import json, sys\n"
            "from pipeline.cli import main\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    assert main(argv) == 0, argv\n")


def _gbif_embed(commands: list[list[str]], onednn: str) -> str:
    # TensorFlow's own start-up lines shown (--verbose), whatever this process
    # inherited from earlier tests that hid them.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GBIF_EMBED_", "TF_CPP_"))}
    env.update(TF_ENABLE_ONEDNN_OPTS=onednn, GBIF_EMBED_VERBOSE="1")
    done = subprocess.run([sys.executable, "-c", COMMANDS, json.dumps(commands)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stderr


def _embeddings(output: str) -> dict:
    latest = open(os.path.join(output, "LATEST")).read().strip()
    table = pq.ParquetDataset(sorted(glob.glob(f"{output}/{latest}/embeddings-*.parquet"))).read()
    return {(r["coreID"], r["identifier"]): (np.asarray(r["embedding"]), r["precision"])
            for r in table.select(["coreID", "identifier", "embedding", "precision"]).to_pylist()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    data = tmp_path_factory.mktemp("onednn-data")
    (data / "images").mkdir()
    with serve_folder(str(data / "images")) as base_url:
        yield make_sample(str(data), base_url, 6, photo_size=(200, 150), with_problems=False)


@pytest.fixture(scope="module")
def both_ways(sample, tmp_path_factory) -> dict:
    """For oneDNN off ("0") and on ("1"): the tiny stand-in built in each
    format, and a run with each; what TensorFlow said about oneDNN."""
    found = {}
    for onednn in ("0", "1"):
        root = tmp_path_factory.mktemp(f"onednn-{onednn}")
        commands = []
        for fmt in FORMATS:
            model = str(root / f"tiny-{fmt}")
            commands.append(["make-model", "--out", model, "--arch", "tiny", "--format", fmt])
            commands.append(["run", "--export", sample.export, "--model", model,
                             "--output", str(root / f"out-{fmt}"), "--precision", "float32",
                             "--quiet", "--report_samples", "0",
                             "--normalize", "imagenet" if fmt == "onnx" else "unit", *LOOPBACK])
        said = _gbif_embed(commands, onednn)
        found[onednn] = {"runs": {fmt: _embeddings(str(root / f"out-{fmt}")) for fmt in FORMATS},
                         "said": said}
    return found


def test_models_build_in_every_format_with_onednn_on_and_off(both_ways):
    # The switch took: TensorFlow says so when oneDNN's custom operations are on.
    assert "oneDNN custom operations are on" in both_ways["1"]["said"]
    assert "oneDNN custom operations are on" not in both_ways["0"]["said"]
    for onednn in ("0", "1"):
        assert set(both_ways[onednn]["runs"]) == set(FORMATS)


def test_a_run_gives_the_same_embeddings_with_onednn_on_and_off(both_ways, sample):
    for fmt in FORMATS:
        off, on = both_ways["0"]["runs"][fmt], both_ways["1"]["runs"][fmt]
        assert len(off) == sample.expected_images and off.keys() == on.keys(), fmt
        for key, (vector, precision) in off.items():
            other, other_precision = on[key]
            assert precision == other_precision == "float32"
            cosine = float(vector @ other / np.linalg.norm(vector) / np.linalg.norm(other))
            assert cosine >= 0.99999, (fmt, key, cosine)
