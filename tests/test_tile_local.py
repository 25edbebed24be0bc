"""vae_core.tiling.halo: halo tiling of local chains equals the untiled run when the radii bound the receptive
fields, and differs measurably when a radius is too small (so the test can fail)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vae_core.tiling.halo import Local, Whole, chain_radius, run_stages


def _net(seed: int = 0):
    torch.manual_seed(seed)
    c1, c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    down = nn.Conv2d(8, 8, 3, stride=2)
    up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 3, 3, padding=1))

    def pad_down(t):  # right/bottom padding then stride 2, as SD's and Wan's downsamplers
        return down(nn.functional.pad(t, (0, 1, 0, 1)))

    def whole(t):  # a global op: mixes in the mean over the whole map
        return t + t.mean(dim=(2, 3), keepdim=True)

    return [Local(lambda t: torch.relu(c2(torch.relu(c1(t)))), radius=2),
            Local(pad_down, radius=1, down=2), Whole(whole), Local(up, radius=1, up=2)]


@pytest.mark.parametrize("size,tile", [((64, 48), 16), ((40, 56), 24), ((32, 32), 8)])
def test_tiled_chain_equals_untiled(size, tile):
    stages = _net()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        ref = x
        for st in stages:
            ref = st.fn(ref)
        got, tiles = run_stages(stages, x, tile, image_scale=1)
    assert got.shape == ref.shape and tiles > 2
    assert (got - ref).abs().max() < 1e-5


def test_too_small_radius_is_not_exact():
    stages = _net()
    bad = [Local(stages[0].fn, radius=1)] + stages[1:]  # two 3×3 convs need 2
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        ref = x
        for st in stages:
            ref = st.fn(ref)
        got, _ = run_stages(bad, x, 16, image_scale=1)
    assert (got - ref).abs().max() > 1e-3


def test_chain_radius_in_output_pixels():
    assert chain_radius([Local(lambda t: t, radius=2), Local(lambda t: t, radius=1, up=2)]) == 6  # (2 + 1) latent px × 2
