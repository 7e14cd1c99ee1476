"""Live progress: counts travel from worker processes to the launcher's display."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

from pipeline.demo.demo import serve_folder
from pipeline.models.make_model import build_model
from pipeline.progress_display import (ProgressDisplay, RateMeter, eta_seconds,
                                       format_duration, format_line)
from pipeline.demo.sample_data import make_sample
from tests.conftest import ROOT
from transforms.common import progress
from transforms.common.progress import Listener

REPORTER = ("from transforms.common import progress\n"
            "progress.report('fetched', {fetched})\n"
            "progress.report('embeddings', {embeddings})\n"
            "progress.flush()\n")


def _wait_for(listener: Listener, expected: dict, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        totals = listener.totals()
        if totals == expected:
            return totals
        time.sleep(0.05)
    return listener.totals()


def test_listener_sums_counts_reported_by_other_processes():
    with Listener() as listener:
        assert os.environ[progress.ENV] == listener.address
        for fetched, embeddings in ((3, 1), (4, 2)):
            subprocess.run([sys.executable, "-c", REPORTER.format(fetched=fetched,
                                                                  embeddings=embeddings)],
                           cwd=ROOT, check=True, timeout=60)
        assert _wait_for(listener, {"fetched": 7, "embeddings": 3}) == \
            {"fetched": 7, "embeddings": 3}
    assert progress.ENV not in os.environ


def test_progress_line_and_estimate():
    assert format_duration(65) == "1:05" and format_duration(3725) == "1:02:05"
    assert eta_seconds(100, 40, 3.0) == 20.0
    assert eta_seconds(100, 40, None) is None and eta_seconds(0, 0, 1.0) is None
    line = format_line({"images": 1000, "fetched": 420, "fetch_failed": 5,
                        "embeddings": 400, "failures": 8}, 12.5, 65)
    assert line == ("425/1,000 images (42%) · fetched 420 · embedded 400 · failed 8 · "
                    "12.5 images/s · ETA 0:46 · 1:05 elapsed")
    # Written rows run behind the fetch on the local runner; reused rows are never
    # fetched: progress is whichever is further.
    assert format_line({"images": 10, "fetched": 6, "fetch_failed": 1}, None, 1) \
        .startswith("7/10 images (70%) · fetched 6 · embedded 0 · failed 1 ·")
    assert format_line({"images": 10, "fetched": 2, "embeddings": 9}, None, 1) \
        .startswith("9/10 images (90%)")
    assert format_line({}, None, 3).startswith("reading the export")


def test_rate_is_measured_over_a_recent_window():
    meter = RateMeter(window=10)
    assert meter.add(0, 0) is None
    assert meter.add(5, 50) == 10.0
    assert meter.add(10, 100) == 10.0
    meter.add(20, 150)
    assert meter.add(30, 150) < 5.0  # a stall shows within the window


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_redrawn_line_and_a_pipe_gets_plain_lines():
    totals = {"images": 10, "fetched": 4, "embeddings": 3, "failures": 1}  # 4 done
    terminal = _Terminal()
    with ProgressDisplay(lambda: totals, terminal, interval=0.05):
        time.sleep(0.3)
    text = terminal.getvalue()
    assert text.count("\r") >= 3 and text.endswith("\n") and text.count("\n") == 1

    pipe = io.StringIO()
    with ProgressDisplay(lambda: totals, pipe, interval=0.05):
        time.sleep(0.3)
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) >= 2
    assert all(line.startswith("4/10 images (40%)") for line in lines)


def test_a_run_shows_progress_and_ends_with_the_summary_table(tmp_path):
    """`gbif-embed run` with stdout on a pipe: plain progress lines, then the summary."""
    model = build_model(str(tmp_path / "tiny"), "tiny")
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    script = os.path.join(os.path.dirname(sys.executable), "gbif-embed")
    with serve_folder(str(images)) as base_url:
        sample = make_sample(str(tmp_path / "data"), base_url, 6, photo_size=(320, 240))
        done = subprocess.run(
            [script, "run", "--export", sample.export, "--model", model,
             "--output", str(tmp_path / "out"), "--allow_private_networks", "127.0.0.1/32"],
            capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    images_read = sample.expected_images + len(sample.expected_failures)
    final = [line for line in out.splitlines() if " elapsed" in line][-1]
    assert final.startswith(f"{images_read}/{images_read} images (100%)"), out
    assert f"embedded {sample.expected_images}" in final
    assert f"failed {len(sample.expected_failures)}" in final
    assert "\r" not in out
    assert re.search(rf"^embedded\s+{sample.expected_images}\s+\d", out, re.M)
    assert re.search(r"^http_404\s+fetch\s+1$", out, re.M)
    assert re.search(r"^truncated\s+decode\s+1$", out, re.M)
    assert "throughput" in out and "images/s" in out
    assert re.search(r"^  report\s+.*report\.html$", out, re.M)
    assert re.search(r"^  embeddings\s+.*embeddings-\*\.parquet \(1 file", out, re.M)


def test_quiet_runs_print_nothing(tmp_path):
    """--quiet: no progress and no summary (the pipeline tests rely on it)."""
    model = build_model(str(tmp_path / "tiny"), "tiny")
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    script = os.path.join(os.path.dirname(sys.executable), "gbif-embed")
    with serve_folder(str(images)) as base_url:
        sample = make_sample(str(tmp_path / "data"), base_url, 2, photo_size=(160, 120),
                             with_problems=False)
        done = subprocess.run(
            [script, "run", "--export", sample.export, "--model", model, "--quiet",
             "--output", str(tmp_path / "out"), "--allow_private_networks", "127.0.0.1/32"],
            capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    assert (tmp_path / "out" / open(tmp_path / "out" / "LATEST").read().strip()
            / "report.html").exists()
