"""Run a built model the way its users run it, whatever its format."""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub

from pipeline.models.formats import IMAGENET_MEAN, IMAGENET_STD


def embed_tf1hub(path: str, images: np.ndarray) -> np.ndarray:
    module = hub.load(path)
    return module.signatures["image_feature_vector"](images=tf.constant(images))["default"].numpy()


def embed_tf2(path: str, images: np.ndarray) -> np.ndarray:
    return hub.load(path)(tf.constant(images)).numpy()


def onnx_session(path: str):
    import onnxruntime
    return onnxruntime.InferenceSession(os.path.join(path, "model.onnx"),
                                        providers=["CPUExecutionProvider"])


def to_pixel_values(images: np.ndarray) -> np.ndarray:
    """NHWC RGB in [0, 1] -> what a torchvision-style model takes: NCHW, ImageNet-normalised."""
    return ((images - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)


def embed_onnx(path: str, images: np.ndarray) -> np.ndarray:
    (out,) = onnx_session(path).run(["embedding"], {"pixel_values": to_pixel_values(images)})
    return out


EMBED = {"tf1hub": embed_tf1hub, "tf2": embed_tf2, "onnx": embed_onnx}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_same_embeddings(reference: np.ndarray, other: np.ndarray) -> None:
    """Equal up to float32 rounding: the formats differ only in op order."""
    assert other.shape == reference.shape and other.dtype == np.float32
    assert cosines(reference, other).min() >= 0.9999
    scale = np.abs(reference).max()
    np.testing.assert_allclose(other, reference, rtol=0, atol=1e-4 * scale)
