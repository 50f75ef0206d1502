"""Attend-and-Excite and box guidance (layout/attend_excite.py): the loss against an independent computation
on captured maps, one update raising the weakest subject's peak, scale 0 = plain sampling exactly, the
shift carrying the moved latent through an Euler step, and bad input."""
import math

import pytest
import torch

from editkit.core.errors import EditKitInputError
from editkit.core.patches import chain_attn_replace, default_attention
from editkit.layout import attend_excite as ae
from editkit.layout.regions import make_region

PROMPT = "a red circle and a blue square on a white background"
NODE = "EditKitAttendAndExcite"


def _loaded(m):
    import comfy.model_management
    comfy.model_management.load_models_gpu([m])
    return m


def _direct_c(m, ctx):
    return {"c_crossattn": ctx, "transformer_options": dict(m.model_options.get("transformer_options", {}))}


def _patched(model, objective, **kw):
    from editkit.core.gradients import gradient_clone
    m = gradient_clone(model)
    patch = ae.LatentUpdate(objective, **kw)
    assert ae.install(m, patch) > 0
    return _loaded(m), patch


def _reference_loss(model, x, sigma, ctx, positions, last):
    """Independent: record q, k at the map sites, softmax in float64, mean over heads and layers, the text
    softmax, an explicit 3x3 Gaussian with reflect padding, 1 - max per subject, max over subjects."""
    m = model.clone()
    seen = []

    def make(prev):
        def fn(q, k, v, extra):
            seen.append((q.detach().double(), k.detach().double(), extra["n_heads"]))
            return default_attention(q, k, v, extra)
        return fn
    for s in ae.map_sites(m):
        chain_attn_replace(m, "attn2", s.key, make)
    _loaded(m)
    with torch.no_grad():
        m.model.apply_model(x, sigma, **_direct_c(m, ctx))
    per_layer = []
    for q, k, heads in seen:
        b, lq, inner = q.shape
        d = inner // heads
        qh = q.reshape(b, lq, heads, d).transpose(1, 2)
        kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
        per_layer.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1).mean(1))
    p = torch.stack(per_layer).mean(0)[0]                         # (L, T)
    t = torch.softmax(100 * p[:, 1:last], -1)
    side = int(round(math.sqrt(t.shape[0])))
    g = torch.tensor([math.exp(-1 / (2 * 0.25)), 1.0, math.exp(-1 / (2 * 0.25))], dtype=torch.float64)
    kern = g[:, None] * g[None, :]
    kern = kern / kern.sum()
    losses, maxes = [], []
    for ps in positions:
        a = t[:, [q - 1 for q in ps]].mean(-1).reshape(side, side)
        pad = torch.zeros(side + 2, side + 2, dtype=torch.float64)
        pad[1:-1, 1:-1] = a
        pad[0, 1:-1], pad[-1, 1:-1] = a[1], a[-2]                 # reflect
        pad[:, 0], pad[:, -1] = pad[:, 2], pad[:, -3]
        sm = torch.stack([torch.stack([(pad[i:i + 3, j:j + 3] * kern).sum() for j in range(side)]) for i in range(side)])
        maxes.append(float(sm.max()))
        losses.append(max(0.0, 1 - maxes[-1]))
    return max(losses), maxes


def _inputs(encode, seed=0, size=16, sigma=8.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, size, size, generator=g) * sigma
    return x, torch.tensor([sigma]), encode(PROMPT)[0][0]


def test_loss_equals_independent_computation(tiny_eps, encode):
    x, sigma, ctx = _inputs(encode)
    positions, last = ((3,), (7,)), 12
    m, patch = _patched(tiny_eps, ae.Objective(positions, last))
    loss, mx, grad = patch.evaluate(m.model.apply_model, x, sigma, _direct_c(m, ctx))
    ref, ref_max = _reference_loss(tiny_eps, x, sigma, ctx, positions, last)
    assert abs(float(loss[0]) - ref) < 1e-5
    assert torch.allclose(mx[0].double(), torch.tensor(ref_max, dtype=torch.float64), atol=1e-5)
    assert grad.shape == x.shape and float(grad.abs().max()) > 0


def test_one_update_raises_the_weakest_subject(tiny_eps, encode):
    x, sigma, ctx = _inputs(encode, seed=2)
    m, patch = _patched(tiny_eps, ae.Objective(((3,), (7,)), 12), scale=2000.0, refine=())  # random weights: flat maps
    c = _direct_c(m, ctx)
    am = m.model.apply_model
    loss0, mx0, _ = patch.evaluate(am, x, sigma, c, grad=False)
    shift = patch.update(am, x, sigma, c, 0, 10, float(sigma), m.model.model_sampling)
    loss1, mx1, _ = patch.evaluate(am, x + shift, sigma, c, grad=False)
    assert float(mx1.min()) > float(mx0.min()) + 1e-4        # the weakest subject's peak rose
    assert float(loss1[0]) < float(loss0[0])
    assert float(shift.abs().max()) > 0


def test_box_loss_formula():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 1, 6, 6, generator=g)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 1:4, 2:5] = 1                       # 9 pixels inside, 27 outside
    out = ae.box_loss(maps, mask, top=0.34, corner=0.0)
    for b in range(2):
        a = maps[b, 0].flatten()
        inside = a[mask.flatten() > 0].sort(descending=True).values[:3].mean()      # round(0.34 * 9) = 3
        outside = a[mask.flatten() == 0].sort(descending=True).values[:9].mean()    # round(0.34 * 27) = 9
        assert abs(float(out[b]) - float(1 - inside + outside)) < 1e-6
    # corner: at the box edges the max-projection of the map should equal the box's (1 inside, 0 outside)
    perfect = mask.expand(2, 1, 6, 6).clone()
    assert float(ae.corner_loss(perfect[:, 0], mask[:, 0]).abs().max()) == 0
    assert float(ae.corner_loss(torch.zeros(2, 6, 6), mask[:, 0]).min()) > 0.4


def test_binding_overlap():
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, :, :2], a[0, 1, :, 2:] = 1, 1          # attribute maps: left, right
    same, swapped = a.clone(), a.flip(1)
    assert float(ae.binding_loss(a, same)) == 0     # each attribute on its own object, not on the other
    assert float(ae.binding_loss(a, swapped)) == 2


def test_zero_scale_is_plain_sampling_and_update_moves(tiny_eps, tiny_clip, encode):
    from ek_helpers import node_out, sample_ksampler
    from editkit.nodes.layout import AttendAndExcite
    neg = encode("")
    lat = torch.zeros(1, 4, 16, 16)
    m0, pos = node_out(AttendAndExcite.execute(tiny_eps, tiny_clip, PROMPT, "circle, square", 0.0, 0.5, True, 3, "", 1.0))
    plain = sample_ksampler(tiny_eps, pos, neg, lat, steps=4, cfg=5.0)
    assert torch.equal(sample_ksampler(m0, pos, neg, lat, steps=4, cfg=5.0), plain)
    m1, _ = node_out(AttendAndExcite.execute(tiny_eps, tiny_clip, PROMPT, "circle, square", 20.0, 0.5, True, 3,
                                             "red circle, blue square", 1.0))
    assert (sample_ksampler(m1, pos, neg, lat, steps=4, cfg=5.0) - plain).abs().max() > 1e-3


def test_shift_equals_moving_the_latent_before_an_euler_step(tiny_eps, encode):
    """The wrapper returns D(x') + (x' - x) s_next / (s - s_next): one Euler step from x with it lands where
    an Euler step from x' lands (reference: the model called on x' directly)."""
    x, sigma, ctx = _inputs(encode, seed=4)
    m, patch = _patched(tiny_eps, ae.Objective(((3,), (7,)), 12), refine=())
    sched = torch.tensor([8.0, 5.0, 0.0])
    c = _direct_c(m, ctx)
    c["transformer_options"]["sample_sigmas"] = sched
    am = m.model.apply_model
    fn = patch.wrapper(lambda a, args: a(args["input"], args["timestep"], **args["c"]))
    with torch.no_grad():
        d_adj = fn(am, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})
    shift = patch.run.shift[0]
    assert float(shift.abs().max()) > 0
    with torch.no_grad():
        d_ref = am(x + shift, sigma, **c)
    euler = x + (x - d_adj) / 8.0 * (5.0 - 8.0)
    ref = (x + shift) + (x + shift - d_ref) / 8.0 * (5.0 - 8.0)
    assert torch.allclose(euler, ref, atol=1e-4 * float(ref.abs().max()))


def test_bad_input(tiny_eps, tiny_clip, encode):
    from ek_helpers import node_out, sample_ksampler
    from editkit.nodes.layout import AttendAndExcite, BoxGuidance
    with pytest.raises(EditKitInputError, match="not in the prompt"):
        AttendAndExcite.execute(tiny_eps, tiny_clip, PROMPT, "circle, triangle", 20.0, 0.5, True, 3, "", 1.0)
    with pytest.raises(EditKitInputError, match="binding"):
        AttendAndExcite.execute(tiny_eps, tiny_clip, PROMPT, "circle", 20.0, 0.5, True, 3, "blue square", 1.0)
    pos = encode(PROMPT)
    unlabeled = (make_region("EditKitRegion", pos, box=(0, 0, 64, 64)),)
    with pytest.raises(EditKitInputError, match="label"):
        BoxGuidance.execute(tiny_eps, tiny_clip, PROMPT, unlabeled, 20.0, 0.5, False, 0, 0.2, 1.0)
    wrong = (make_region("EditKitRegion", pos, box=(0, 0, 64, 64), label="triangle"),)
    with pytest.raises(EditKitInputError, match="not in the prompt"):
        BoxGuidance.execute(tiny_eps, tiny_clip, PROMPT, wrong, 20.0, 0.5, False, 0, 0.2, 1.0)
    outside = (make_region("EditKitRegion", pos, box=(100, 0, 64, 64), label="circle"),)
    m, p = node_out(BoxGuidance.execute(tiny_eps, tiny_clip, PROMPT, outside, 20.0, 0.5, False, 0, 0.2, 1.0))
    with pytest.raises(EditKitInputError, match="outside the 128x128"):
        sample_ksampler(m, p, encode(""), torch.zeros(1, 4, 16, 16), steps=2, cfg=5.0)


def test_box_guidance_moves_the_map_into_the_box(tiny_eps, encode):
    x, sigma, ctx = _inputs(encode, seed=5)
    box = make_region("EditKitRegion", encode(PROMPT), box=(0, 0, 64, 64), label="circle")
    m, patch = _patched(tiny_eps, ae.Objective(((3,),), 12, excite=0.0, boxes=(box,), node="EditKitBoxGuidance"),
                        scale=20.0, refine=())
    c = _direct_c(m, ctx)
    am = m.model.apply_model
    loss0, _, _ = patch.evaluate(am, x, sigma, c, grad=False)
    shift = patch.update(am, x, sigma, c, 0, 10, float(sigma), m.model.model_sampling)
    loss1, _, _ = patch.evaluate(am, x + shift, sigma, c, grad=False)
    assert float(loss1[0]) < float(loss0[0])
