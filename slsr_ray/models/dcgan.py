"""The DCGAN of the paper (section 4.2), one generator/discriminator pair per k-means cluster.

Paper architecture (128x128 output, the default)::

    G: z ~ U[-1, 1]^100 -> Linear -> 8x8x512 -> BN, ReLU
       -> ConvT 5x5/2 512->256 -> BN, ReLU   (16x16)
       -> ConvT 5x5/2 256->128 -> BN, ReLU   (32x32)
       -> ConvT 5x5/2 128->64  -> BN, ReLU   (64x64)
       -> ConvT 5x5/2 64->3    -> tanh       (128x128x3)
    D: x (128x128x3)
       -> Conv 5x5/2 3->64 -> BN, ReLU  -> Conv 5x5/2 64->128 -> BN, ReLU
       -> Conv 5x5/2 128->256 -> BN, ReLU -> Conv 5x5/2 256->512 -> BN, ReLU (8x8x512)
       -> Linear -> 1 -> sigmoid

Choices where the paper is silent or where we offer a switch:

* **Other output sizes.** ``image_size`` must be a multiple of 16: G always has the same four
  upsampling stages and starts from ``image_size/16`` squared (8x8 for 128, 4x4 for 64, 2x2 for 32),
  so a 64x64 CPU demo is the paper's network minus nothing but resolution.
* **Width.** ``ngf``/``ndf`` are the channel counts of the widest-resolution layer (64 in the paper:
  G's layers are ngf*8, ngf*4, ngf*2, ngf). Tiny values (8, 16) make CPU tests fast.
* **D activation.** The paper says "batch normalization and ReLU" after every conv of D, so that is
  the default (``d_activation="relu"``). ``"leaky"`` is the original DCGAN recipe the paper cites
  (Radford et al.): LeakyReLU(0.2) and no BatchNorm on D's first layer; it gives D gradients for
  negative pre-activations and is the safer choice if the paper setting collapses on a dataset.
* **Sigmoid.** ``Discriminator.forward`` returns the logit; the sigmoid is applied inside
  ``BCEWithLogitsLoss`` (mathematically the same, numerically stable). ``Discriminator.probability``
  returns the sigmoid output.
* **Aspect ratio.** Re-id crops are rectangular (128x64 on Market-1501); as in LSRO, the DCGAN is
  trained on crops resized to a square, and generated squares are resized back to the re-id shape
  when written to disk (``slsr_ray.generate.generate_images(image_size=(h, w))``).
* **Init.** Weights N(0, 0.02), BatchNorm scales N(1, 0.02), as in DCGAN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

KERNEL = 5
STAGES = 4  # stride-2 stages in G and D (paper: four)
D_ACTIVATIONS = ("relu", "leaky")


@dataclass(frozen=True)
class DCGANArch:
    """Everything that determines the tensor shapes of G and D (stored in every checkpoint)."""

    image_size: int = 128
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    d_activation: str = "relu"

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (>= 16), got {self.image_size}")
        if self.nz < 1 or self.ngf < 1 or self.ndf < 1:
            raise ValueError(f"nz, ngf and ndf must be positive, got nz={self.nz} ngf={self.ngf} ndf={self.ndf}")
        if self.d_activation not in D_ACTIVATIONS:
            raise ValueError(f"d_activation must be one of {D_ACTIVATIONS}, got {self.d_activation!r}")

    @property
    def base_size(self) -> int:
        """Spatial size of G's first feature map (8 for 128x128 output)."""
        return self.image_size // 2**STAGES

    def to_dict(self) -> dict:
        return asdict(self)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (N x nz, uniform in [-1, 1]) -> images (N x 3 x S x S) in [-1, 1]."""

    def __init__(self, arch: DCGANArch):
        super().__init__()
        self.arch = arch
        widths = [arch.ngf * 2 ** (STAGES - 1 - i) for i in range(STAGES)]  # 512, 256, 128, 64
        self.project = nn.Linear(arch.nz, widths[0] * arch.base_size**2)
        self.project_bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        for i in range(STAGES):
            out = widths[i + 1] if i + 1 < STAGES else 3
            # padding 2 + output_padding 1 makes a 5x5 stride-2 deconvolution exactly double the size
            layers.append(nn.ConvTranspose2d(widths[i], out, KERNEL, 2, padding=2, output_padding=1, bias=False))
            layers += [nn.BatchNorm2d(out), nn.ReLU(True)] if out != 3 else [nn.Tanh()]
        self.deconvs = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.arch.base_size, self.arch.base_size)
        return self.deconvs(torch.relu(self.project_bn(x)))


class Discriminator(nn.Module):
    """Images (N x 3 x S x S in [-1, 1]) -> real/fake logit (N,)."""

    def __init__(self, arch: DCGANArch):
        super().__init__()
        self.arch = arch
        widths = [3] + [arch.ndf * 2**i for i in range(STAGES)]  # 3, 64, 128, 256, 512
        layers: list[nn.Module] = []
        for i in range(STAGES):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], KERNEL, 2, padding=2, bias=False))
            if arch.d_activation == "relu":
                layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU(True)]
            else:  # DCGAN (Radford et al.): no BN on the input layer, LeakyReLU 0.2
                if i > 0:
                    layers.append(nn.BatchNorm2d(widths[i + 1]))
                layers.append(nn.LeakyReLU(0.2, True))
        self.convs = nn.Sequential(*layers)
        self.classify = nn.Linear(widths[-1] * arch.base_size**2, 1)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.convs(x).flatten(1)).squeeze(1)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's sigmoid output: probability that ``x`` is a real image."""
        return torch.sigmoid(self.forward(x))


def build_dcgan(arch: DCGANArch) -> tuple[Generator, Discriminator]:
    """A freshly initialised (G, D) pair for ``arch``."""
    return Generator(arch), Discriminator(arch)


def sample_noise(n: int, nz: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ U[-1, 1]^nz, as in the paper."""
    return torch.rand(n, nz, generator=generator) * 2 - 1
