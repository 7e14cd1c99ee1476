"""What a run needs to know about its model, whatever its format.

Embedders come as TF1 Hub modules (the withdrawn fungi_V2 and its stand-in),
TF2 SavedModels (Kaggle Models, where TF Hub's models moved) and ONNX files
(PyTorch exports: BioCLIP, DINOv2, ...). They differ in input size, layout,
value range and output width. `ModelSpec` holds those facts once they are
read from the model (or given by flags where the model does not declare
them), so that decoding makes pictures of the right size, the output schema
has the right width, the manifest says what was used, and a refresh can
rebuild the same model input without loading the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

FORMATS = ("tf1hub", "tf2", "onnx")
LAYOUTS = ("NHWC", "NCHW")
# Published mean and std per RGB channel, applied after scaling pixels to [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # TF Hub's image convention: RGB in [0, 1]
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
# A variable-size input (some TF2 models) gets this size unless --image_size says.
ASSUMED_SIZE = 224


class ModelError(ValueError):
    """The model cannot be used; says what was expected and what was found."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's contract as the run uses it.

    `size_from` says where `image_size` came from: "model" (declared by its
    input), "flag" (--image_size, for a model that declares none) or
    "assumed" (neither: ASSUMED_SIZE, and the run says so).
    """

    format: str
    image_size: int
    layout: str
    width: int
    normalize: str = "unit"
    input_name: str = ""
    output_name: str = ""
    size_from: str = "model"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def describe(self) -> str:
        size = {"model": "", "flag": " (--image_size)",
                "assumed": " (assumed: the model declares no size; pass --image_size)"}
        return (f"{self.format}, input {self.input_name or '?'} {self.layout} "
                f"{self.image_size}x{self.image_size}{size.get(self.size_from, '')}, "
                f"--normalize {self.normalize}, output {self.output_name or '?'} "
                f"{self.width} floats")


def picture_size(height: Optional[int], width: Optional[int], image_size: int,
                 model_uri: str) -> tuple[int, str]:
    """(size, where it came from): the model's own where its input declares one."""
    if height is not None and width is not None:
        if height != width:
            raise ModelError(f"expected a square image input in {model_uri}; found "
                             f"{height}x{width}")
        if image_size and image_size != height:
            raise ModelError(f"--image_size {image_size} does not match {model_uri}, whose "
                             f"input is {height}x{width}; leave --image_size out")
        return int(height), "model"
    if image_size:
        return image_size, "flag"
    return ASSUMED_SIZE, "assumed"


def scale_and_offset(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """uint8 pixel p → p·scale + offset per channel: [0, 1], then (x − mean) / std."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, "
                         f"not {normalize!r}")
    mean, std = NORMALIZATIONS[normalize]
    return (tuple(1.0 / (255.0 * s) for s in std), tuple(-m / s for m, s in zip(mean, std)))


def embedder_fingerprint(files_fingerprint: str, spec: ModelSpec, resize: str,
                         precision: Optional[str] = None) -> str:
    """The identity of what makes a row's embedding: the model's files and every
    option that changes its input. Rows (and cached embeddings) of two
    embedders never mix.

    The model's files alone are the fingerprint when every such option has
    the value a TF1 Hub module at its declared size has always had (unit
    values, squash, float32), so snapshots made before these options existed
    keep matching their model.
    """
    extra = {}
    if spec.normalize != "unit":
        extra["normalize"] = spec.normalize
    if spec.size_from != "model":
        extra["image_size"] = spec.image_size
    if resize != "squash":
        extra["resize"] = resize
    if precision and precision != "float32":
        extra["precision"] = precision
    if not extra:
        return files_fingerprint
    digest = hashlib.sha256((files_fingerprint + json.dumps(extra, sort_keys=True)).encode())
    return "sha256:" + digest.hexdigest()[:32]
