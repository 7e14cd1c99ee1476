"""`gbif-embed plan`: the counts are the run's counts, and the arithmetic holds."""
from __future__ import annotations

import json
import math

import pytest

from pipeline import machine
from pipeline.tools.plan import estimate, job_rate, lower_bound_s, plan_command
from pipeline.demo.sample_data import DMS_DATASET_KEY, Media, Occurrence, write_dwca
from transforms.fetch.config import FetchConfig
from transforms.read.export import ExportError, ReadArchive

SHARED = "https://a.example.org/shared/placeholder.jpg"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    """6 occurrences; host a: 4 distinct URLs (one shared by 3 rows), b: 2, c: 1;
    one Sound row and one text/html row the run skips, one duplicate pair."""
    occurrences = [Occurrence(gbifID=100 + i, occurrenceID=f"o{i}", datasetKey=DMS_DATASET_KEY,
                              taxonKey=7, scientificName="Agaricus testus") for i in range(6)]
    media = [Media(100, "https://a.example.org/1.jpg"), Media(100, SHARED),
             Media(101, "https://a.example.org/2.jpg"), Media(101, SHARED),
             Media(102, "https://A.example.org/3.jpg"), Media(102, SHARED),
             Media(103, "https://b.example.org/x/1.jpg"),
             Media(103, "https://b.example.org/x/2.jpg"),
             Media(104, "https://c.example.org/only.jpg"),
             Media(104, "https://c.example.org/only.jpg"),          # duplicate pair: dropped
             Media(105, "https://c.example.org/call.mp3", type="Sound", format="audio/mpeg"),
             Media(105, "https://c.example.org/page", format="text/html")]
    return write_dwca(str(tmp_path_factory.mktemp("plan") / "export.zip"), occurrences, media)


def _plan(export: str, tmp_path, *flags: str) -> dict:
    out = tmp_path / "plan.json"
    assert plan_command(["--export", export, "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_counts_are_the_runs_counts(export, tmp_path, capsys):
    plan = _plan(export, tmp_path, "--images_per_second_per_vcpu", "2")
    run_rows = [out for out in ReadArchive().process(export) if isinstance(out, tuple)]
    # The run's join drops the duplicate (gbifID, identifier) pair.
    assert plan["images"] == len(run_rows) - 1 == 9
    assert plan["distinct_urls"] == 7  # the shared URL once; the upper-case host is host a
    assert plan["hosts"] == 3
    assert [(h["host"], h["urls"]) for h in plan["top_hosts"]] == [
        ("a.example.org", 4), ("b.example.org", 2), ("c.example.org", 1)]
    assert plan["skipped"] == {"skipped.not_still_image": 1,
                               "skipped.declared_format_not_image": 1,
                               "skipped.duplicate_image": 1}
    text = capsys.readouterr().out
    assert "a.example.org" in text and "not modelled:" in text and "vCPUs (avx2" in text


def test_lower_bounds_at_given_limits(export, tmp_path):
    plan = _plan(export, tmp_path, "--images_per_second_per_vcpu", "2",
                 "--per_host_rate", "2", "--per_host_concurrency", "4")
    bounds = {h["host"]: h["lower_bound_s"] for h in plan["top_hosts"]}
    assert bounds == {"a.example.org": 2.0, "b.example.org": 1.0, "c.example.org": 0.5}
    # The job-wide rate is what the fetch stage grants: floor(rate) in any second.
    assert job_rate(FetchConfig(per_host_concurrency=4, per_host_rate=2.5), "h") == 2.0
    assert job_rate(FetchConfig(per_host_concurrency=8, per_host_rate=0.5), "h") == 0.5
    assert lower_bound_s(10, 0.0) == 0.0  # no rate limit


def test_flags_mean_what_they_mean_for_run(export, tmp_path):
    mirrored = _plan(export, tmp_path, "--images_per_second_per_vcpu", "2",
                     "--mirror", "https://a.example.org/=https://mirror.example.net/a/")
    assert mirrored["top_hosts"][0] == {"host": "mirror.example.net", "urls": 3,
                                        "lower_bound_s": 3 / 20}
    cache = _plan(export, tmp_path, "--images_per_second_per_vcpu", "2",
                  "--image_source", "gbif_cache")
    # GBIF's cache URL holds the gbifID: the shared identifier is 3 URLs there.
    assert cache["hosts"] == 1 and cache["distinct_urls"] == 9
    assert cache["top_hosts"][0]["host"] == "api.gbif.org"


def test_wall_time_vcpu_hours_and_useful_workers(export, tmp_path):
    assert estimate(100.0, 10.0, 2, 4) == {
        "compute_s": 12.5, "wall_s": 12.5, "vcpu_hours": 12.5 * 8 / 3600,
        "useful_workers_max": 3, "bound_by": "compute",
        # A model change reads the store: compute only, spread over the 8 vCPUs.
        "model_change_s": 12.5, "model_change_vcpu_hours": 100.0 / 3600,
        # Dataflow and Flink in batch mode: ByContent is a barrier, the phases add up.
        "fetch_s": 10.0, "batch_wall_s": 22.5, "batch_vcpu_hours": 22.5 * 8 / 3600}
    host_bound = estimate(100.0, 40.0, 2, 4)
    assert host_bound["wall_s"] == 40.0 and host_bound["bound_by"] == "host"
    assert host_bound["model_change_s"] == 12.5  # the host does not bound a model change
    assert host_bound["useful_workers_max"] == 1
    assert estimate(100.0, 0.0, 1, 1)["useful_workers_max"] is None

    plan = _plan(export, tmp_path, "--images_per_second_per_vcpu", "0.25",
                 "--per_host_rate", "1", "--per_host_concurrency", "1",
                 "--workers", "3", "--vcpus_per_worker", "2")
    assert plan["rate_per_vcpu"] == 0.25
    assert plan["rate_source"] == "--images_per_second_per_vcpu"
    assert plan["compute_vcpu_s"] == 7 / 0.25 == 28.0
    assert (plan["workers"], plan["vcpus_per_worker"]) == (3, 2)
    # Host a: 4 URLs at 1/s = 4 s; compute 28 vCPU-s on 6 vCPUs = 4.67 s.
    assert plan["wall_s"] == pytest.approx(28 / 6)
    assert plan["vcpu_hours"] == pytest.approx(28 / 3600)
    assert plan["useful_workers_max"] == math.ceil(28 / (4.0 * 2)) == 4
    assert plan["batch_wall_s"] == pytest.approx(4 + 28 / 6)
    assert set(plan) >= {"cpu", "images", "distinct_urls", "hosts", "top_hosts",
                         "rate_per_vcpu", "rate_source", "compute_vcpu_s", "workers",
                         "vcpus_per_worker", "wall_s", "vcpu_hours", "useful_workers_max"}
    assert plan["cpu"]["model"] == machine.cpu_model()


def test_missing_export_fails_like_run(tmp_path):
    with pytest.raises(ExportError, match="found nothing there"):
        plan_command(["--export", str(tmp_path / "nope.zip"),
                      "--images_per_second_per_vcpu", "1"])


def test_without_a_rate_it_gives_the_hosts_and_says_how_to_get_the_rest(export, tmp_path,
                                                                        capsys):
    plan = _plan(export, tmp_path)
    out = capsys.readouterr().out
    assert plan["compute_vcpu_s"] is None and plan["rate_per_vcpu"] is None
    assert plan["wall_s"] == plan["top_hosts"][0]["lower_bound_s"] > 0
    assert "pass --model PATH" in out and "--images_per_second_per_vcpu X" in out
    assert plan["store_bytes"] == plan["distinct_urls"] * plan["store_bytes_per_picture"]


def test_flags_that_give_no_plan(export):
    with pytest.raises(ValueError, match="--export is required"):
        plan_command(["--images_per_second_per_vcpu", "1"])
    with pytest.raises(ValueError, match="must be positive"):
        plan_command(["--export", export, "--images_per_second_per_vcpu", "0"])


def test_measures_the_model_on_this_cpu(export, tmp_path, tiny_model):
    plan = _plan(export, tmp_path, "--model", tiny_model, "--measure_seconds", "0.5")
    assert plan["rate_per_vcpu"] > 0
    assert plan["rate_source"].startswith("measured here:")
    assert plan["compute_vcpu_s"] == pytest.approx(7 / plan["rate_per_vcpu"])


CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16
"""


def test_machine_description():
    assert machine.cpu_model(CPUINFO) == "AMD EPYC 9B14"
    assert machine.vector_flags(CPUINFO) == ["avx2", "avx512f", "avx512_bf16"]
    described = machine.describe_cpu(CPUINFO)
    assert described.startswith("AMD EPYC 9B14, ")
    assert "avx512_bf16 yes, amx_bf16 no" in described
    assert machine.vector_flags("") == []
