"""The run's model at launch: its contract, spec and fingerprint, before anything is fetched.

A first run loads the model and checks its contract (`check_contract`); a
refresh whose previous snapshot was made with the very same files and input
options reuses that snapshot's recorded spec instead, since loading
TensorFlow and the model only to check them again would be most of a small
refresh's time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transforms.embed.model_files import fingerprint, localize, model_format
from transforms.embed.spec import ModelSpec, embedder_fingerprint
from transforms.write.snapshot import read_manifest

# What a manifest written before models had specs recorded: the fungi_V2 contract.
LEGACY = {"format": "tf1hub", "image_size": 299, "layout": "NHWC", "normalize": "unit",
          "input_name": "image_feature_vector:images", "output_name": "default",
          "size_from": "model"}


@dataclass(frozen=True)
class RunModel:
    uri: str
    spec: ModelSpec
    files_fingerprint: str
    fingerprint: str       # what the rows carry: files and input options
    checked_now: bool      # False: the previous snapshot's check was reused

    def manifest_entry(self) -> dict:
        return {"uri": self.uri, "fingerprint": self.fingerprint,
                "files_fingerprint": self.files_fingerprint,
                "embedding_dim": self.spec.width, "format": self.spec.format,
                "image_size": self.spec.image_size, "layout": self.spec.layout,
                "normalize": self.spec.normalize, "spec": self.spec.to_json()}


def spec_of_manifest(model: dict) -> ModelSpec:
    """The spec a manifest's `model` records (the legacy contract for old ones)."""
    data = dict(LEGACY, width=model.get("embedding_dim") or 256)
    data.update(model.get("spec") or {})
    return ModelSpec.from_json(data)


def run_model(uri: str, *, embedding_dim: int, normalize: str, image_size: int,
              resize: str, output: str, previous: Optional[str]) -> RunModel:
    """Checks the model (or reuses the previous snapshot's check) and fingerprints it."""
    from transforms.embed.models import check_contract
    local = localize(uri)
    model_format(local, uri)  # a clear error for a folder that holds no model
    files = fingerprint(local)
    spec = _checked_before(output, previous, files, embedding_dim, normalize, image_size)
    checked_now = spec is None
    if spec is None:
        spec = check_contract(uri, embedding_dim, normalize, image_size)
    return RunModel(uri, spec, files, embedder_fingerprint(files, spec, resize), checked_now)


def _checked_before(output: str, previous: Optional[str], files: str, embedding_dim: int,
                    normalize: str, image_size: int) -> Optional[ModelSpec]:
    if previous is None:
        return None
    try:
        model = read_manifest(output, previous).get("model") or {}
    except (OSError, ValueError):
        return None
    if (model.get("files_fingerprint") or model.get("fingerprint")) != files:
        return None
    spec = spec_of_manifest(model)
    if spec.normalize != normalize or (embedding_dim and spec.width != embedding_dim):
        return None
    if (image_size or 0) != (spec.image_size if spec.size_from == "flag" else 0):
        return None
    return spec
