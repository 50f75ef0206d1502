"""Drag editing: the EDITKIT_DRAG value (JSON round trip, validation naming the field), SDE-Drag's
copy-paste on the latent grid, the region outside the drag kept exactly on every model space, and the
dragged object's centroid moving to its target on the toy model (toy-world scorer)."""
import json

import pytest
import torch

from editkit.drag import sde_drag as S
from editkit.drag.points import DragError, DragPoints
from editkit.nodes.drag import DragPointsNode, SDEDrag
from ek_helpers import node_out


def _drag(pairs=(((40, 40), (72, 40)),), w=128, h=128, **kw):
    return DragPoints(w, h, tuple(pairs), **kw)


# -- the value ------------------------------------------------------------------------------------

def test_json_round_trip_with_strokes():
    text = json.dumps({"width": 512, "height": 384, "points": [{"handle": [10, 20.5], "target": [100, 30]},
                                                                [[5, 6], [7, 8]]],
                       "mask": {"strokes": [[50, 50, 20, 1], [50, 50, 5, 0]]}})
    d = DragPoints.from_json(text)
    assert (d.width, d.height) == (512, 384) and d.pairs == (((10, 20.5), (100, 30)), ((5, 6), (7, 8)))
    again = DragPoints.from_json(d.to_json())
    assert again == d and again.to_dict()["version"] == 1
    reg = d.region()
    assert reg.shape == (384, 512)
    assert reg[50, 65] == 1 and reg[50, 50] == 0 and reg[10, 10] == 0     # painted ring, erased centre


def test_size_from_image_when_missing():
    d = DragPoints.from_json('{"points": [{"handle": [1, 2], "target": [3, 4]}]}', width=64, height=32)
    assert (d.width, d.height) == (64, 32)


@pytest.mark.parametrize("text, field", [
    ("", "points"), ("{nope", "points"), ('{"points": []}', "width"),
    ('{"width": 64, "height": 64, "points": [{"handle": [1, 2]}]}', "points[0]"),
    ('{"width": 64, "height": 64, "points": [{"handle": [1, "a"], "target": [3, 4]}]}', "points[0].handle.y"),
    ('{"width": -3, "height": 64, "points": []}', "width"),
    ('{"width": 64, "height": 64, "points": [], "mask": {"strokes": [[1, 1, 0, 1]]}}', "mask.strokes[0].radius"),
])
def test_bad_json_names_the_field(text, field):
    with pytest.raises(DragError) as e:
        DragPoints.from_json(text)
    assert e.value.field == field


def test_validation():
    with pytest.raises(DragError, match="no handle/target pairs"):
        _drag(()).validate()
    with pytest.raises(DragError, match=r"points\[0\].target.*outside the 128x128 image"):
        _drag((((10, 10), (128, 5)),)).validate()
    m = torch.zeros(128, 128)
    m[:, :60] = 1
    with pytest.raises(DragError, match=r"points\[0\].target.*outside the editable region"):
        _drag().with_mask(m).validate()
    m[:, :] = 1
    assert _drag().with_mask(m).validate().has_mask


def test_fit_scales_points_and_refuses_other_aspect():
    d = _drag((((100, 200), (300, 50)),), w=512, h=512, strokes=())
    f = d.fit(128, 128)
    assert f.pairs == (((25, 50), (75, 12.5)),) and (f.width, f.height) == (128, 128)
    with pytest.raises(DragError, match="another aspect ratio"):
        d.fit(128, 64)


def test_points_node_errors_name_the_input():
    img = torch.zeros(1, 64, 96, 3)
    (d,) = node_out(DragPointsNode.execute('{"points": [{"handle": [10, 10], "target": [50, 20]}]}', image=img))
    assert (d.width, d.height) == (96, 64)
    with pytest.raises(ValueError, match="EditKitDragPoints: input 'image'.*96x64.*aspect"):
        DragPointsNode.execute('{"width": 128, "height": 128, "points": [{"handle": [1, 1], "target": [2, 2]}]}', image=img)
    (big,) = node_out(DragPointsNode.execute('{"width": 192, "height": 128, "points": [{"handle": [20, 20], '
                                             '"target": [100, 40]}]}', image=img))
    assert big.pairs == (((10, 10), (50, 20)),) and (big.width, big.height) == (96, 64)
    with pytest.raises(ValueError, match="EditKitDragPoints: input 'points'.*no handle/target"):
        DragPointsNode.execute('{"width": 128, "height": 128, "points": []}')


# -- the copy-paste ---------------------------------------------------------------------------------

def test_copy_paste_moves_the_noisy_patch():
    d = _drag((((36, 36), (60, 44)),))                    # (+24, +8) px = (+3, +1) latent px
    plan = S.plan_moves(d, 16, 16, radius=9.0, sub_moves=1)
    (mv,) = plan[0]
    assert (mv.dy, mv.dx) == (1, 3) and mv.source[4, 4] and int(mv.source.sum()) > 1
    x = torch.randn(1, 4, 16, 16)
    fill = torch.full_like(x, 100.0)
    out, edit = S.copy_paste(x, fill, [mv])
    tgt = mv.target
    ys, xs = torch.nonzero(mv.source, as_tuple=True)
    torch.testing.assert_close(out[..., ys + 1, xs + 3], x[..., ys, xs])
    left = mv.source & ~tgt
    assert left.any() and torch.all(out[..., left] == 100.0)
    untouched = ~(mv.source | tgt)
    torch.testing.assert_close(out[..., untouched], x[..., untouched])
    assert torch.all(edit[mv.source | tgt]) and not edit[15, 15]


def test_sub_moves_add_up_to_the_drag():
    d = _drag((((20, 20), (100, 52)),))
    plan = S.plan_moves(d, 16, 16, radius=6.0, sub_moves=3)
    assert len(plan) == 3
    assert sum(m[0].dx for m in plan) == 10 and sum(m[0].dy for m in plan) == 4
    # each sub-move starts where the previous one left the patch
    torch.testing.assert_close(plan[1][0].source, plan[0][0].target)


def test_outside_the_drag_is_kept_exactly(tiny_any, encode):
    """Every model space: latent pixels outside the moved patch's old and new places (dilated) come back
    exactly as they went in."""
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    d = _drag((((12, 12), (36, 20)),), w=64, h=64)
    out, info = S.sde_drag(tiny_any, encode("a red circle"), None, lat, d, t0=0.5, steps=6, radius=5.0, seed=3)
    (mv,) = info.moves[0]
    far = ~S.dilate(mv.source | mv.target, 1)
    assert far.any() and info.evaluations == info.steps == 3
    torch.testing.assert_close(out[..., far], lat[..., far], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all() and not torch.allclose(out[..., ~far], lat[..., ~far])


def test_node_bad_input(tiny_flux, tiny_eps, encode):
    pos = encode("a red circle")
    d = _drag()
    lat4 = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="EditKitSDEDrag: input 'latent'.*channels"):
        SDEDrag.execute(tiny_flux, pos, lat4, d, 0.6, 4, 1.0, 1, 20.0, "normal", 0)
    with pytest.raises(ValueError, match="EditKitSDEDrag: input 't0'"):
        SDEDrag.execute(tiny_eps, pos, lat4, d, 0.0, 4, 1.0, 1, 20.0, "normal", 0)
    with pytest.raises(ValueError, match="EditKitSDEDrag: input 'drag'.*aspect ratio"):
        SDEDrag.execute(tiny_eps, pos, {"samples": torch.zeros(1, 4, 16, 8)}, d, 0.6, 4, 1.0, 1, 20.0, "normal", 0)
    with pytest.raises(ValueError, match="EditKitSDEDrag: input 'drag'.*EDITKIT_DRAG"):
        SDEDrag.execute(tiny_eps, pos, lat4, "{}", 0.6, 4, 1.0, 1, 20.0, "normal", 0)


# -- on the toy model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_triple():
    from editkit.builtin_models import toy
    return toy.load_toy_cached()


def test_object_follows_the_drag_on_the_toy_model(toy_triple):
    """A toy-world drag case (two objects, one moved 31 px): the scorer reads the dragged object within
    the drag tolerance of its target, its colour/shape kept, the other object in place, no copy left."""
    from editkit.toyworld import editbench
    model, clip, vae = toy_triple
    ctx = editbench.EditContext(model, clip, vae)
    case = editbench.drag_cases(1)[0]
    img = case.source_image()
    region = torch.from_numpy(case.source.masks()[case.index] | case.target.masks()[case.index]).float()
    d = DragPoints(128, 128, ((case.handle, case.goal),)).with_mask(region)
    size = case.source.objects[case.index].size
    (out,) = node_out(SDEDrag.execute(model, ctx.encode(case.source_prompt), {"samples": ctx.latent(img)}, d, 0.6, 20,
                                      5.0, 1, size * 0.75, "normal", 0, negative=ctx.encode("")))
    edited = ctx.decode(out["samples"]).numpy()
    before = case.score(img.numpy())
    sc = case.score(edited)
    assert before.centroid_error > 20
    assert sc.ok, sc.why
    assert sc.centroid_error < 4.0 and sc.preserve_psnr > 25


# -- DragDiffusion (library; node and workflow not yet) -------------------------------------------

@pytest.mark.slow
def test_drag_diffusion_tracks_the_handle_toward_its_target(toy_triple):
    """Motion supervision on the toy model's decoder features moves the tracked handle toward the target
    (point tracking reads the features of the optimised latent), the loss falls, and the user's model is
    left without EditKit patches."""
    from editkit.drag.drag_diffusion import drag_diffusion
    from editkit.toyworld import editbench
    model, clip, vae = toy_triple
    before = (dict(model.model_options.get("transformer_options", {})), len(model.weight_wrappers)
              if hasattr(model, "weight_wrappers") else 0)
    ctx = editbench.EditContext(model, clip, vae)
    case = editbench.drag_cases(2, min_shift=16, max_shift=40)[1]
    region = torch.from_numpy(case.source.masks()[case.index] | case.target.masks()[case.index]).float()
    d = DragPoints(128, 128, ((case.handle, case.goal),)).with_mask(region)
    out, info = drag_diffusion(model, ctx.encode(case.source_prompt), None, ctx.latent(case.source_image()), d,
                               steps=10, inversion_steps=7, iterations=8, lr=0.05)
    (hx, hy), (tx, ty) = case.handle, case.goal
    nx, ny = info.handles[0]
    start = ((tx - hx) ** 2 + (ty - hy) ** 2) ** 0.5
    now = ((tx - nx) ** 2 + (ty - ny) ** 2) ** 0.5
    assert now < start - 3.0, (info.describe(), start, now)     # >= 1.5 feature px closer in 8 steps
    assert info.iterations >= 1 and torch.isfinite(out).all() and out.shape == (1, 4, 16, 16)
    after = (dict(model.model_options.get("transformer_options", {})), len(model.weight_wrappers)
             if hasattr(model, "weight_wrappers") else 0)
    assert after == before


def test_drag_diffusion_node_bad_input(tiny_eps, encode):
    from editkit.nodes.drag import DragDiffusion
    pos, lat = encode("a red circle"), {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="EditKitDragDiffusion: input 'inversion_steps'"):
        DragDiffusion.execute(tiny_eps, pos, lat, _drag(), 10, 20, 4, 0.01, 0.1, 1.0, True, 0)
    with pytest.raises(ValueError, match="EditKitDragDiffusion: input 'lr'"):
        DragDiffusion.execute(tiny_eps, pos, lat, _drag(), 10, 5, 4, 0.0, 0.1, 1.0, True, 0)
    with pytest.raises(ValueError, match="EditKitDragDiffusion: input 'drag'.*no handle/target"):
        DragDiffusion.execute(tiny_eps, pos, lat, _drag(()), 10, 5, 4, 0.01, 0.1, 1.0, True, 0)
