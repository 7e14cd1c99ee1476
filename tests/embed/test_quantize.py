"""The self-check that judges any precision (transforms/embed/fidelity.py), and
the int8 evaluation's pieces (bench/int8.py, bench/int8_convert.py: evaluated,
not adopted): the calibration input, quantising the trained Lite0 and the
`tiny` stand-in converted from its TF1 Hub module. Fidelity and speed figures
are bench/precision.py's; these check the pieces work and fit."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, shared_path
from bench.int8 import model_input
from transforms.embed.fidelity import cosines, nearest_neighbours, self_check
from transforms.embed.spec import ModelSpec


def _photos(size: int, n: int) -> np.ndarray:
    """The first n real photos as the pipeline decodes the store's copy."""
    from transforms.embed.decode import decode_image
    from transforms.store.copies import make_copy
    folder = shared_path("fungi-images")
    names = sorted(name for name in os.listdir(folder) if name.endswith(".jpg"))[:n]
    return np.stack([decode_image(make_copy((folder / name).read_bytes()).data,
                                  resize="squash", size=size)[0] for name in names])


def _clusters(seed: int = 0) -> np.ndarray:
    """Six well separated pairs of embeddings: each row's neighbour is its pair."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 32))
    return np.repeat(centres, 2, axis=0) + 0.05 * rng.normal(size=(12, 32))


def test_self_check_passes_the_same_embeddings_and_reports_figures():
    reference = _clusters()
    result = self_check(reference, reference * 3.0)  # a scale is no change of direction
    assert result["passed"] and result["images"] == 12
    assert result["cosine_min"] == pytest.approx(1.0)
    assert result["neighbour_agreement"] == 1.0


def test_self_check_fails_one_picture_below_the_cosine_bound():
    reference = _clusters()
    candidate = reference.copy()
    candidate[3] += 0.2 * np.linalg.norm(candidate[3]) * np.eye(32)[0]
    result = self_check(reference, candidate)
    assert result["cosine_min"] < 0.995 and not result["passed"]


def test_self_check_fails_when_neighbours_change():
    reference = _clusters()
    # The same pictures, paired differently: every direction kept, every neighbour moved.
    candidate = reference[[0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 11]]
    result = self_check(reference, candidate, cosine_min=-1.0)
    assert result["neighbour_agreement"] < 0.95 and not result["passed"]


def test_self_check_refuses_mismatched_or_non_finite_input():
    with pytest.raises(ValueError):
        self_check(np.ones((4, 3)), np.ones((5, 3)))
    candidate = _clusters()
    candidate[0, 0] = np.nan
    assert not self_check(_clusters(), candidate)["passed"]


def test_nearest_neighbours_and_cosines():
    embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbours(embeddings).tolist() == [1, 0, 3, 2]
    assert cosines(embeddings, -embeddings) == pytest.approx(-np.ones(4))


def test_model_input_is_what_the_onnx_loader_feeds():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    spec = ModelSpec("onnx", 8, "NCHW", 0, "imagenet")
    x = model_input(pixels, spec)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    expected = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert x.dtype == np.float32 and x.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(x, expected, atol=1e-5)
    np.testing.assert_array_equal(model_input(pixels, spec, "tensor(uint8)"), pixels)


def test_importing_needs_neither_onnx_nor_onnxruntime():
    code = ("import sys; import transforms.embed.fidelity, bench.int8, bench.int8_convert; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'tensorflow', 'tf2onnx') "
            "if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), check=True)


def test_float_nodes_keep_the_graph_input_scaling_in_float(lite0_models):
    import onnx
    from bench.int8 import float_nodes
    model = onnx.load(os.path.join(lite0_models["onnx"], "model.onnx"))
    leading = float_nodes(model)
    first_conv = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Conv")
    assert leading == [n.name for n in model.graph.node[:first_conv]]
    assert {model.graph.node[i].op_type for i in range(first_conv)} <= {"Mul", "Add"}
    assert len(float_nodes(model, float_head=1.0)) == len(model.graph.node)
    assert len(leading) < len(float_nodes(model, float_head=0.4)) < len(model.graph.node)


def test_lite0_onnx_quantised_on_real_photos_embeds_like_float32(lite0_models, tmp_path):
    from transforms.embed.models import load
    from bench.int8 import cpu_has_vnni, load_quantized, quantize_onnx
    pixels = _photos(224, 12)
    reference = load(lite0_models["onnx"], normalize="imagenet", threads=2)
    out_dir = tmp_path / "out"
    path = quantize_onnx(os.path.join(lite0_models["onnx"], "model.onnx"), pixels[:8],
                         reference.spec, str(out_dir / "int8.onnx"), float_head=0.4,
                         ranges_path=str(tmp_path / "ranges.json"))
    assert os.listdir(out_dir) == ["int8.onnx"]  # no scratch files left beside it
    assert (tmp_path / "ranges.json").stat().st_size > 0  # a later float share reuses them
    model = load_quantized(path, reference.spec, threads=2)
    assert model.precise == (not cpu_has_vnni())
    out = model.embed(pixels)
    assert out.dtype == np.float32 and out.shape == (12, 1280)
    result = self_check(reference.embed(pixels), out)
    # bench/precision.py holds the figures (min about 0.997 on 48 pictures);
    # this bound only says the pieces fit (a saturating kernel gives ~0.57).
    assert result["cosine_min"] > 0.98, result


def test_quantize_refuses_pictures_that_are_not_uint8(lite0_models, tmp_path):
    from bench.int8 import quantize_onnx
    spec = ModelSpec("onnx", 224, "NCHW", 0, "imagenet")
    with pytest.raises(ValueError, match="uint8"):
        quantize_onnx(os.path.join(lite0_models["onnx"], "model.onnx"),
                      np.zeros((2, 224, 224, 3), np.float32), spec, str(tmp_path / "q.onnx"))


def test_tiny_tf1hub_converts_to_onnx_and_quantises(tiny_model, tmp_path):
    pytest.importorskip("tf2onnx")
    import onnxruntime as ort
    from transforms.embed.models import load
    from bench.int8 import load_quantized, quantize_onnx
    from bench.int8_convert import tf_to_onnx
    model = load(tiny_model)
    size = model.spec.image_size
    pixels = np.random.default_rng(1).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    path = tf_to_onnx(model, str(tmp_path / "tiny.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "images" and graph_input.type == "tensor(uint8)"
    converted = session.run(None, {"images": pixels})[0]
    np.testing.assert_allclose(converted, model.embed(pixels), rtol=1e-4, atol=1e-4)
    int8 = load_quantized(quantize_onnx(path, pixels, model.spec, str(tmp_path / "q.onnx")),
                          model.spec, threads=2)
    out = int8.embed(pixels)
    assert out.shape == converted.shape and np.isfinite(out).all()


def test_cpu_has_vnni_reads_the_flags():
    from bench.int8 import cpu_has_vnni
    assert cpu_has_vnni({"avx2", "avx512_vnni"}) and cpu_has_vnni({"avx_vnni"})
    assert cpu_has_vnni({"amx_int8"}) and not cpu_has_vnni({"avx2", "fma", "avx512f"})


def test_lite0_tf2_without_signatures_converts_to_the_same_embeddings(lite0_models, tmp_path):
    pytest.importorskip("tf2onnx")
    import onnxruntime as ort
    from transforms.embed.models import load
    from bench.int8_convert import tf_to_onnx
    model = load(lite0_models["tf2"])
    pixels = _photos(224, 4)
    session = ort.InferenceSession(tf_to_onnx(model, str(tmp_path / "lite0.onnx")),
                                   providers=["CPUExecutionProvider"])
    converted = session.run(None, {"images": pixels})[0]
    assert self_check(model.embed(pixels), converted)["cosine_min"] > 0.99999


def test_cached_model_builds_once_per_key(tmp_path):
    from bench.int8_convert import cached_model, recipe_key
    spec = ModelSpec("tf1hub", 224, "NHWC", 1280, "unit")
    key = recipe_key("sha256:abc", spec, float_head=0.4)
    assert key != recipe_key("sha256:abd", spec, float_head=0.4)
    assert key != recipe_key("sha256:abc", spec, float_head=0.0)
    built = []

    def build(path: str) -> str:
        built.append(path)
        with open(path, "wb") as handle:
            handle.write(b"model")
        return path

    first, made = cached_model(str(tmp_path), key, build)
    again, made_again = cached_model(str(tmp_path), key, build)
    assert (made, made_again) == (True, False)
    assert first == again and len(built) == 1 and os.listdir(tmp_path) == [key + ".onnx"]
