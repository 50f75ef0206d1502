"""Model introspection: family, parameterization, attention layout discovered from the module tree."""
import pytest

from editkit.core import introspect as I


def test_tiny_models_family_and_parameterization(tiny_eps, tiny_v, tiny_flow, tiny_flux):
    assert (I.architecture(tiny_eps), I.parameterization(tiny_eps)) == ("unet", I.EPS)
    assert I.parameterization(tiny_v) == I.V_PREDICTION
    assert I.parameterization(tiny_flow) == I.FLOW
    assert I.model_family(tiny_eps) == I.UNET_OTHER
    assert (I.architecture(tiny_flux), I.model_family(tiny_flux), I.parameterization(tiny_flux)) == ("flux", I.FLUX, I.FLOW)


def test_tiny_unet_layout(tiny_eps):
    lay = I.attention_layout(tiny_eps)
    assert lay.blocks("input") == [1, 3] and lay.blocks("middle") == [0] and lay.blocks("output") == [0, 1, 2, 3]
    assert [s.order for s in lay.sites] == list(range(len(lay.sites)))
    assert {s.downsample for s in lay.sites} == {1, 2}
    assert all(s.cross and s.heads == 2 for s in lay.sites)
    site = next(s for s in lay.sites if s.block == "middle")
    assert site.resolution(16, 16) == (8, 8) and site.resolution(15, 17) == (8, 9)


def test_tiny_flux_layout(tiny_flux):
    lay = I.attention_layout(tiny_flux)
    assert [(b.kind, b.index) for b in lay.dit_blocks] == [("double_block", 0), ("double_block", 1),
                                                          ("single_block", 0), ("single_block", 1)]


def test_tiny_sd3_family_and_layout():
    from editkit.builtin_models.tiny import tiny_sd3
    m = tiny_sd3(depth=3)
    assert (I.architecture(m), I.model_family(m), I.parameterization(m)) == ("mmdit", I.SD3, I.FLOW)
    assert [(b.kind, b.index) for b in I.attention_layout(m).dit_blocks] == [("double_block", i) for i in range(3)]


def test_require_architecture_names_the_input(tiny_flux):
    with pytest.raises(ValueError, match=r"EditKitX: input 'model'.*Flux"):
        I.require_architecture(tiny_flux, {"unet"}, "EditKitX")


@pytest.mark.slow
def test_sd15_full_layout(sd15_full):
    assert I.model_family(sd15_full) == I.SD1 and I.parameterization(sd15_full) == I.EPS
    lay = I.attention_layout(sd15_full)
    assert lay.blocks("input") == [1, 2, 4, 5, 7, 8]
    assert lay.blocks("middle") == [0]
    assert lay.blocks("output") == list(range(3, 12))
    assert len(lay.sites) == 16 and all(s.depth == 0 for s in lay.sites)
    # latent 64x64 (512 px): 64, 32, 16 and 8 (middle) resolutions
    res = {(s.block, s.number): s.resolution(64, 64) for s in lay.sites}
    assert res[("input", 1)] == (64, 64) and res[("input", 7)] == (16, 16) and res[("middle", 0)] == (8, 8)
    assert res[("output", 3)] == (16, 16) and res[("output", 11)] == (64, 64)
    assert {s.heads for s in lay.sites} == {8}


@pytest.mark.slow
def test_sdxl_full_layout(sdxl_full):
    assert I.model_family(sdxl_full) == I.SDXL
    lay = I.attention_layout(sdxl_full)
    assert lay.blocks("input") == [4, 5, 7, 8]
    assert lay.blocks("middle") == [0]
    assert lay.blocks("output") == [0, 1, 2, 3, 4, 5]
    depth = {}
    for s in lay.sites:
        depth[(s.block, s.number)] = depth.get((s.block, s.number), 0) + 1
    assert depth[("input", 4)] == 2 and depth[("input", 7)] == 10 and depth[("middle", 0)] == 10
    assert depth[("output", 0)] == 10 and depth[("output", 5)] == 2
    assert len(lay.sites) == 70
    assert {s.downsample for s in lay.sites} == {2, 4}
