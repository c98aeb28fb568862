"""The DCGAN of the paper (section 4.2): shapes, layer structure and options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slsr_ray.models.dcgan import DCGANArch, Discriminator, Generator, build_dcgan, sample_noise


def test_paper_architecture_128():
    arch = DCGANArch()  # paper defaults
    G, D = build_dcgan(arch)
    # G: linear z(100) -> 8x8x512, four 5x5 stride-2 deconvs 512->256->128->64->3, tanh
    assert G.project.in_features == 100 and G.project.out_features == 8 * 8 * 512
    deconvs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [(512, 256), (256, 128), (128, 64), (64, 3)]
    assert all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in deconvs)
    assert isinstance(G.deconvs[-1], nn.Tanh)
    # D: four 5x5 stride-2 convs, each followed by BN + ReLU (paper), a linear layer
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 64), (64, 128), (128, 256), (256, 512)]
    assert all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in D.modules()) == 4
    assert D.classify.in_features == 8 * 8 * 512 and D.classify.out_features == 1

    z = sample_noise(2, 100)
    assert z.min() >= -1 and z.max() <= 1
    with torch.no_grad():
        x = G(z)
        p = D.probability(x)
    assert x.shape == (2, 3, 128, 128) and x.abs().max() <= 1
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_smaller_outputs_keep_four_stages(size):
    arch = DCGANArch(image_size=size, ngf=8, ndf=8)
    assert arch.base_size == size // 16
    G, D = Generator(arch), Discriminator(arch)
    with torch.no_grad():
        x = G(sample_noise(3, arch.nz))
    assert x.shape == (3, 3, size, size)
    assert D(x).shape == (3,)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in G.modules()) == 4


def test_leaky_option_follows_radford():
    D = Discriminator(DCGANArch(image_size=32, ndf=8, d_activation="leaky"))
    assert sum(isinstance(m, nn.LeakyReLU) for m in D.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3  # none on the input layer


@pytest.mark.parametrize(
    "kwargs, match",
    [({"image_size": 100}, "multiple of 16"), ({"image_size": 8}, "multiple of 16"),
     ({"d_activation": "tanh"}, "d_activation"), ({"ngf": 0}, "positive")],
)
def test_bad_arch_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCGANArch(**kwargs)
