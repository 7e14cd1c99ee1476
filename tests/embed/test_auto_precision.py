"""`--precision auto`: decided once for the job by the launcher, on a sample of
the run's own pictures that no host is asked for twice; a candidate is taken
only if it passes the self-check; the verdict is kept per machine; every row
of a job carries the same precision, however many processes run it."""
from __future__ import annotations

import numpy as np
import pytest

import pipeline.precision_choice as choice
import transforms.embed.auto_precision as auto
from pipeline.precision_sample import Sample
from transforms.embed.auto_precision import candidates, decide, read_verdict


@pytest.fixture(autouse=True)
def verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "_VERDICTS", str(tmp_path / "verdicts"))


WEIGHTS = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)


def _float32(pixels: np.ndarray) -> np.ndarray:
    """A stand-in model: a fixed projection of each picture's first 12 values."""
    return pixels.reshape(len(pixels), -1)[:, :12].astype(np.float32) @ WEIGHTS


def _runner(noise: float, calls: list):
    """`runner(name)` as the launcher gives it: a function at that precision; a
    candidate here is float32 with noise (faithful when small, not when large)."""
    rng = np.random.default_rng(1)

    def runner(name: str):
        calls.append(name)
        if name == "float32":
            return _float32
        return lambda pixels: _float32(pixels) * (1 + noise * rng.standard_normal((1, 16)))
    return runner


def _pixels(n: int = 40) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (n, 4, 4, 3), np.uint8)


def test_a_faithful_candidate_is_taken_with_its_figures():
    calls: list = []
    verdict = decide("model-a", ["bfloat16"], _runner(1e-4, calls), _pixels())
    assert verdict["precision"] == "bfloat16" and verdict["sample"] == auto.SAMPLE
    assert verdict["checks"]["bfloat16"]["passed"]
    assert verdict["checks"]["bfloat16"]["cosine_min"] > 0.999
    assert calls[-1] == "float32"  # the launcher's process is left in float32


def test_an_unfaithful_candidate_is_refused_and_float32_stays():
    calls: list = []
    verdict = decide("model-b", ["bfloat16"], _runner(0.5, calls), _pixels())
    assert verdict["precision"] == "float32"
    assert verdict["checks"]["bfloat16"]["passed"] is False
    assert calls[-1] == "float32"


def test_a_candidate_that_cannot_run_is_one_that_failed():
    def runner(name: str):
        if name != "float32":
            raise ValueError("no such kernels here")
        return _float32
    verdict = decide("model-c", ["bfloat16"], runner, _pixels())
    assert verdict["precision"] == "float32"
    assert "no such kernels here" in verdict["checks"]["bfloat16"]["error"]


def test_the_verdict_is_kept_on_the_machine_per_model():
    decide("model-d", ["bfloat16"], _runner(1e-4, []), _pixels())
    assert read_verdict("model-d", ["bfloat16"])["precision"] == "bfloat16"
    assert read_verdict("model-e", ["bfloat16"]) is None


def test_candidates_follow_the_cpu_and_the_format(monkeypatch):
    monkeypatch.setattr(auto, "cpu_supports_bfloat16", lambda: True)
    assert candidates("tf1hub") == ["bfloat16"] and candidates("tf2") == ["bfloat16"]
    assert candidates("onnx") == []  # oneDNN's bfloat16 is TensorFlow's
    assert candidates("tf1hub", "float32") == [] and candidates("onnx", "bfloat16") == ["bfloat16"]
    monkeypatch.setattr(auto, "cpu_supports_bfloat16", lambda: False)
    assert candidates("tf1hub") == []


class _Model:
    """What choose_precision reads of the launcher's RunModel."""

    def __init__(self, fmt: str = "tf1hub", fingerprint: str = "sha256:m"):
        from transforms.embed.spec import ModelSpec
        self.fingerprint = fingerprint
        self.spec = ModelSpec(format=fmt, image_size=4, layout="NHWC", normalize="unit",
                              input_name="images", output_name="default", width=16,
                              size_from="model")


def _no_sample():
    raise AssertionError("no sample may be taken here")


def test_the_choice_asks_for_no_sample_where_nothing_is_to_decide(monkeypatch):
    monkeypatch.setattr(choice, "candidates", lambda fmt, requested="auto": ["bfloat16"])
    forced = choice.choose_precision("float32", _Model(), distributed=False, sample=_no_sample)
    assert forced["precision"] == "float32" and forced["decided_by"] == "--precision float32"
    remote = choice.choose_precision("auto", _Model(), distributed=True, sample=_no_sample)
    assert remote["precision"] == "float32" and "distributed" in remote["decided_by"]
    monkeypatch.setattr(choice, "candidates", lambda fmt, requested="auto": [])
    plain = choice.choose_precision("auto", _Model(), distributed=False, sample=_no_sample)
    assert plain["precision"] == "float32" and "neither avx512_bf16" in plain["decided_by"]
    onnx = choice.choose_precision("auto", _Model("onnx"), distributed=False, sample=_no_sample)
    assert "ONNX" in onnx["decided_by"]


def test_the_choice_runs_the_check_once_then_reuses_the_verdict(monkeypatch):
    monkeypatch.setattr(choice, "candidates", lambda fmt, requested="auto": ["bfloat16"])
    monkeypatch.setattr(choice, "_runner", lambda model: _runner(1e-4, []))
    taken = []

    def sample():
        taken.append(1)
        return Sample(list(_pixels()), "image store")
    first = choice.choose_precision("auto", _Model(), distributed=False, sample=sample)
    assert first["precision"] == "bfloat16" and first["sample"]["source"] == "image store"
    assert first["checks"]["bfloat16"]["passed"] and "check on 32" in first["decided_by"]
    again = choice.choose_precision("auto", _Model(), distributed=False, sample=_no_sample)
    assert again["precision"] == "bfloat16" and "kept on this machine" in again["decided_by"]
    too_few = choice.choose_precision("auto", _Model(fingerprint="sha256:other"),
                                      distributed=False,
                                      sample=lambda: Sample(list(_pixels(3)), "fetched"))
    assert too_few["precision"] == "float32" and "too few" in too_few["decided_by"]
    assert taken == [1]


def _export(tmp_path, server, n: int) -> str:
    from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo, write_dwca
    for i in range(n):
        server.add(f"/img/{i}.jpg", jpeg_bytes(synthetic_photo(i, species=i % 3, size=(96, 72))),
                   headers={"Content-Type": "image/jpeg"})
    occurrences = [Occurrence(gbifID=1000 + i, occurrenceID=f"urn:occ:{i}",
                              datasetKey="84d26682-f762-11e1-a439-00145eb45e9a",
                              taxonKey=5000 + i, scientificName=f"Species {i}")
                   for i in range(n)]
    media = [Media(gbifID=1000 + i, identifier=server.url(f"/img/{i}.jpg")) for i in range(n)]
    return write_dwca(str(tmp_path / "export.zip"), occurrences, media)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_job_decides_once_on_its_own_pictures_and_asks_no_host_twice(
        tmp_path, tiny_model, monkeypatch, processes):
    """On any CPU and kernel set: a candidate is offered (whether it passes
    depends on them: with oneDNN off it changes nothing, with oneDNN on it
    really runs bfloat16), the launcher fetches the first 32 pictures into the
    store for the check, the pipeline takes them from there (the run's
    planning finds them in the store), and every row, in every worker process,
    carries the job's one precision."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.cli import run
    from tests.compare.test_refresh import _rows
    from tests.conftest import LOOPBACK
    from tests.http_server import FaultServer
    monkeypatch.setattr(choice, "candidates", lambda fmt, requested="auto": ["bfloat16"])
    n = 40
    extra = (["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
             if processes == 2 else [])
    with FaultServer() as server:
        export = _export(tmp_path, server, n)
        manifest = run(PipelineOptions([
            "--export", export, "--model", tiny_model, "--output", str(tmp_path / "out"),
            "--quiet", "--report_samples", "0", "--batch_size", "4", *LOOPBACK, *extra]))
        hits = [server.hits(f"/img/{i}.jpg") for i in range(n)]
    assert hits == [1] * n  # the sample's 32 were not fetched again
    decided = manifest["precision"]
    chosen = decided["precision"]
    assert decided["sample"]["source"] == "fetched" and decided["sample"]["requests"] == auto.SAMPLE
    assert chosen == ("bfloat16" if decided["checks"]["bfloat16"]["passed"] else "float32")
    assert manifest["counts"]["embedded"] == n
    assert manifest["counts"]["from_store"] == auto.SAMPLE
    assert manifest["tally"]["fetch.requests"] == n - auto.SAMPLE
    assert {row["precision"] for row in _rows(str(tmp_path / "out")).values()} == {chosen}
    assert manifest["counts"]["inferences_by_precision"] == {chosen: n}


def test_a_run_records_each_rows_precision(tmp_path, tiny_model):
    """On any CPU, unpatched: every row and the manifest say what the vectors
    were computed in, and they agree."""
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
    chosen = manifest["precision"]["precision"]
    assert rows and {r["precision"] for r in rows.values()} == {chosen}
    by_precision = manifest["counts"]["inferences_by_precision"]
    assert by_precision == {chosen: manifest["counts"]["inferences"]}
    assert manifest["precision"]["requested"] == "auto" and manifest["precision"]["decided_by"]
