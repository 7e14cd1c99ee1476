"""gs:// inputs and outputs, against a GCS emulator on loopback."""
from __future__ import annotations

import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import make_sample
from tests.conftest import LOOPBACK
from transforms.embed.model_files import fingerprint
from transforms.write.snapshot import read_latest


def test_export_and_model_on_gcs(tmp_path, tiny_model, gcs_bucket):
    fs = fsspec.filesystem("gs")
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    with serve_folder(str(images)) as base_url:
        sample = make_sample(str(tmp_path / "data"), base_url, 4, photo_size=(160, 120),
                             with_problems=False)
        fs.put(sample.export, f"{gcs_bucket}/exports/export.zip")
        fs.put(tiny_model, f"{gcs_bucket}/models/tiny", recursive=True)
        output = str(tmp_path / "out")
        manifest = run(PipelineOptions([
            "--export", f"{gcs_bucket}/exports/export.zip",
            "--model", f"{gcs_bucket}/models/tiny", "--output", output, "--quiet",
            *LOOPBACK]))
    assert manifest["counts"]["embedded"] == sample.expected_images
    assert manifest["export"]["download_key"] == sample.download_key
    assert read_latest(output) == manifest["snapshot"]
    assert manifest["model"]["fingerprint"] == fingerprint(tiny_model)
