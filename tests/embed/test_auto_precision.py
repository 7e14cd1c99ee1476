"""`--precision auto`: a candidate precision is taken only if it passes the
self-check on the run's own first pictures; the verdict is kept per machine;
every row says what it was computed in."""
from __future__ import annotations

import numpy as np
import pytest

import transforms.embed.auto_precision as auto
from transforms.embed.auto_precision import PrecisionChooser, candidates


@pytest.fixture(autouse=True)
def verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "_VERDICTS", str(tmp_path / "verdicts"))


WEIGHTS = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)


def _float32(pixels: np.ndarray) -> np.ndarray:
    """A stand-in model: a fixed projection of each picture's first 12 values."""
    return pixels.reshape(len(pixels), -1)[:, :12].astype(np.float32) @ WEIGHTS


def _runner(noise: float, calls: list):
    """`runner(name)` as the handler gives it: a function at that precision; a
    candidate here is float32 with noise (faithful when small, not when large)."""
    rng = np.random.default_rng(1)

    def runner(name: str):
        calls.append(name)
        if name == "float32":
            return _float32
        return lambda pixels: _float32(pixels) * (1 + noise * rng.standard_normal((1, 16)))
    return runner


def _batches(n: int, size: int = 8):
    rng = np.random.default_rng(2)
    return [rng.integers(0, 256, (size, 4, 4, 3), np.uint8) for _ in range(n)]


def test_a_faithful_candidate_is_taken_after_the_sample_and_rows_say_so():
    calls: list = []
    chooser = PrecisionChooser("model-a", ["bfloat16"], _float32, _runner(1e-4, calls))
    precisions, reports = [], []
    for batch in _batches(6):
        vectors, precision, report = chooser.embed(batch)
        assert vectors.shape == (8, 16)
        precisions.append(precision)
        reports.append(report)
    # 32 pictures (4 batches of 8) in float32, then the candidate.
    assert precisions == ["float32"] * 4 + ["bfloat16"] * 2
    check = reports[3]
    assert check["precision"] == "bfloat16" and check["sample"] == auto.SAMPLE
    assert check["checks"]["bfloat16"]["passed"]
    assert check["checks"]["bfloat16"]["cosine_min"] > 0.999
    assert [r for r in reports if r] == [check]  # reported once


def test_an_unfaithful_candidate_is_refused_and_float32_stays():
    calls: list = []
    chooser = PrecisionChooser("model-b", ["bfloat16"], _float32, _runner(0.5, calls))
    precisions = [chooser.embed(batch)[1] for batch in _batches(6)]
    assert precisions == ["float32"] * 6
    assert chooser.check["checks"]["bfloat16"]["passed"] is False
    assert calls[-1] == "float32"  # the process was switched back


def test_the_verdict_is_kept_on_the_machine_and_reused():
    calls: list = []
    first = PrecisionChooser("model-c", ["bfloat16"], _float32, _runner(1e-4, calls))
    for batch in _batches(4):
        first.embed(batch)
    second = PrecisionChooser("model-c", ["bfloat16"], _float32, _runner(1e-4, calls))
    vectors, precision, report = second.embed(_batches(1)[0])
    assert precision == "bfloat16" and report["cached"] is True  # no sample this time
    other_model = PrecisionChooser("model-d", ["bfloat16"], _float32, _runner(1e-4, calls))
    assert other_model.embed(_batches(1)[0])[1] == "float32"  # its own check first


def test_without_a_candidate_everything_is_float32_at_no_cost():
    calls: list = []
    chooser = PrecisionChooser("model-e", [], _float32, _runner(1e-4, calls))
    assert {chooser.embed(batch)[1] for batch in _batches(5)} == {"float32"}
    assert calls == []


def test_candidates_follow_the_cpu_and_the_format(monkeypatch):
    monkeypatch.setattr(auto, "cpu_supports_bfloat16", lambda: True)
    assert candidates("tf1hub") == ["bfloat16"] and candidates("tf2") == ["bfloat16"]
    assert candidates("onnx") == []  # oneDNN's bfloat16 is TensorFlow's
    assert candidates("tf1hub", "float32") == [] and candidates("onnx", "bfloat16") == ["bfloat16"]
    monkeypatch.setattr(auto, "cpu_supports_bfloat16", lambda: False)
    assert candidates("tf1hub") == []


def test_a_run_records_each_rows_precision(tmp_path, tiny_model):
    """On any CPU: every row and the manifest say what the vectors were computed in."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.cli import run
    from pipeline.demo.demo import serve_folder
    from pipeline.demo.sample_data import make_sample
    from tests.compare.test_refresh import _rows
    from tests.conftest import LOOPBACK
    (tmp_path / "images").mkdir()
    with serve_folder(str(tmp_path / "images")) as base_url:
        sample = make_sample(str(tmp_path), base_url, 8, photo_size=(120, 90))
        manifest = run(PipelineOptions(["--export", sample.export, "--model", tiny_model,
                                        "--output", str(tmp_path / "out"), "--quiet",
                                        "--report_samples", "0", *LOOPBACK]))
    rows = _rows(str(tmp_path / "out"))
    assert rows and {r["precision"] for r in rows.values()} <= {"float32", "bfloat16"}
    by_precision = manifest["counts"]["inferences_by_precision"]
    assert sum(by_precision.values()) == manifest["counts"]["inferences"]
    assert "precision" in manifest and "processes_by_precision" in manifest["precision"]
