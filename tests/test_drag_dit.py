"""The drag methods on DiTs (tiny SD3 MMDiT and Flux models, 16 latent channels): SDE-Drag keeps everything
outside the moved patch exactly; DragDiffusion's point tracking on the DiT block at the decoder's relative
depth moves the handle toward its target; DragonDiffusion's / DiffEditor's energy guidance lowers the edit
energy against an unguided control and stays finite from the full inversion's sigma 1 of a flow model
(eps guidance divided by 1 - sigma there)."""
import pytest
import torch
from editkit.builtin_models import tiny
from editkit.drag import dragon as D
from editkit.drag import sde_drag as S
from editkit.drag.points import DragPoints
from ek_helpers import node_out


@pytest.fixture(scope="module", params=["sd3", "flux"])
def dit(request):
    return tiny.tiny_sd3(seed=0) if request.param == "sd3" else tiny.tiny_flux(seed=0)


def _drag():
    return DragPoints(64, 64, (((16, 16), (40, 24)),))


def _latent(seed):
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_sde_drag_keeps_the_outside_exactly(dit, encode):
    lat = _latent(0)
    out, info = S.sde_drag(dit, encode("a red circle"), None, lat, _drag(), t0=0.5, steps=6, radius=5.0, seed=3)
    (mv,) = info.moves[0]
    far = ~S.dilate(mv.source | mv.target, 1)
    assert far.any() and info.evaluations == 3
    torch.testing.assert_close(out[..., far], lat[..., far], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all() and not torch.allclose(out[..., ~far], lat[..., ~far])


def test_drag_diffusion_moves_the_handle_toward_its_target(dit, encode):
    from editkit.nodes.drag import DragDiffusion
    d = _drag()
    res = DragDiffusion.execute(dit, encode("a red circle"), {"samples": _latent(1)}, d, 6, 4, 4, 0.05, 0.1, 1.0, True, 0)
    out = node_out(res)[0]["samples"]
    (hx, hy), (tx, ty) = d.pairs[0]
    text = res.ui["text"][0]
    nx, ny = (float(v) for v in text.rsplit("handles now at (", 1)[1].split(")")[0].split(","))
    assert ((tx - nx) ** 2 + (ty - ny) ** 2) ** 0.5 < ((tx - hx) ** 2 + (ty - hy) ** 2) ** 0.5 - 1.0, text
    assert torch.isfinite(out).all() and out.shape == (1, 16, 8, 8)


@pytest.mark.parametrize("diffeditor", [False, True])
def test_energy_guidance_lowers_the_edit_energy(dit, encode, diffeditor):
    """Full inversion (sigma 1 on these flow models): guided at energy scale 1 vs a control at 1e-9 (same
    evaluations, no effect): the last guided step's edit energy is lower, the result finite."""
    pos, lat, d = encode("a red circle"), _latent(2), _drag()
    kw = {"steps": 6, "cfg": 1.0, "diffeditor": diffeditor, "guide_until": 1.0, "time_travel": 1, "seed": 0}
    out, info = D.dragon_drag(dit, pos, None, lat, d, energy_scale=1.0, **kw)
    _, control = D.dragon_drag(dit, pos, None, lat, d, energy_scale=1e-9, **kw)
    assert info.guided == control.guided >= 3
    assert torch.isfinite(out).all() and all(torch.isfinite(torch.tensor(e)).all() for e in info.energies)
    assert info.energies[-1][0] < control.energies[-1][0] - 0.05, (info.energies, control.energies)


def test_a_model_without_decoder_features_is_refused_naming_the_families_that_work(encode):
    """A one-level UNet has no decoder level to read: the feature-based nodes name the model input and the
    families that work (SDE-Drag needs no features)."""
    from editkit.core.errors import EditKitInputError
    from editkit.nodes.drag import DiffEditor, DragDiffusion, DragonDiffusion
    cfg = dict(tiny.TINY_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1])
    m = tiny.tiny_unet(config=cfg)
    pos, lat, d = encode("a red circle"), {"samples": torch.zeros(1, 4, 8, 8)}, _drag()
    dragon = (6, 6, 1.0, 1.0, 4.0, 6.0, 0.2, 0.6, True)
    for run in (lambda: DragDiffusion.execute(m, pos, lat, d, 6, 4, 2, 0.05, 0.1, 1.0, True, 0),
                lambda: DragonDiffusion.execute(m, pos, lat, d, *dragon, 42),
                lambda: DiffEditor.execute(m, pos, lat, d, *dragon, sde_strength=0.4, time_travel=2, seed=42)):
        with pytest.raises(EditKitInputError, match=r"input 'model': this model has no decoder features.*"
                                                    r"SD1\.x, SD2\.x, SDXL\) or a DiT \(SD3, Flux\)"):
            run()
