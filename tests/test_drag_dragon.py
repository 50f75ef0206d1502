"""DragonDiffusion / DiffEditor (drag/dragon.py): the energy's gradient pulls the target's features toward the
handle's on a constructed feature map; zero energy scale gives back the plain DDIM reconstruction of the
inversion (the memory bank's keys/values change nothing when the edit equals the source); the dragged object
follows the drag on the toy model (toy-world scorer); an interrupted drag leaves the model and inputs
untouched; bad input names the input."""
import pytest
import torch

from editkit.drag import dragon as D
from editkit.drag.points import DragPoints
from ek_helpers import node_out


def _drag(pairs=(((40, 40), (72, 40)),), w=128, h=128):
    return DragPoints(w, h, tuple(pairs))


# -- the energy ---------------------------------------------------------------------------------------

def test_energy_gradient_pulls_target_features_toward_the_handle():
    with torch.inference_mode(False), torch.enable_grad():     # as inside run_with_gradients
        _energy_gradient_checks()


def _energy_gradient_checks():
    g = torch.Generator().manual_seed(0)
    fh = fw = 16
    ref = torch.randn(1, 8, fh, fw, generator=g)
    region = torch.zeros(64, 64)
    region[:, :40] = 1                                   # left part of a 64 px image editable
    d = DragPoints(64, 64, (((10, 20), (30, 20)),)).with_mask(region)
    masks = D.drag_masks(d, fh, fw, 8, 8)
    (hm,), (tm,) = masks.handles, masks.targets
    assert int(hm.sum()) == int(tm.sum()) == 9 and not (hm & tm).any()
    cur = ref.clone().requires_grad_(True)
    e_edit, e_con = D.energies([cur], [ref], masks, 4.0, 6.0, 0.2)
    g_edit, = torch.autograd.grad(e_edit, cur, retain_graph=True)
    g_con, = torch.autograd.grad(e_con, cur)
    # the edit energy acts on the target patch (and the handle's old place) only
    moved = hm | tm
    assert g_edit[0][:, ~moved].abs().max() == 0 and g_edit[0][:, tm].abs().max() > 0
    # one descent step makes the target features more like the source's handle features
    before = D.similarity(cur[0][:, tm].t(), ref[0][:, hm].t()).mean()
    step = (cur - 0.5 * g_edit).detach()
    after_ = D.similarity(step[0][:, tm].t(), ref[0][:, hm].t()).mean()
    assert after_ > before + 1e-3
    e2, _ = D.energies([step], [ref], masks, 4.0, 6.0, 0.2)
    assert e2 < e_edit
    # consistency acts outside the editable region only, and is at its minimum (zero gradient) at the source
    assert masks.outside.any() and g_con[0][:, ~masks.outside].abs().max() == 0
    assert g_con.abs().max() < 1e-6
    shifted = (cur + 0.3 * torch.randn(cur.shape, generator=g)).detach()
    _, e_far = D.energies([shifted], [ref], masks, 4.0, 6.0, 0.2)
    assert e_far > e_con


def test_regional_sde_step_is_ddim_outside_and_noisy_inside(tiny_eps):
    ms = tiny_eps.get_model_object("model_sampling")
    g = torch.Generator().manual_seed(1)
    x0, eps, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    x = x0 + 3.0 * eps
    region = torch.zeros(8, 8)
    region[:4] = 1
    out = D.ddim_eta_step(ms, x, x0, eps, 3.0, 1.5, 0.4 * region, noise)
    ddim = x0 + 1.5 * eps
    torch.testing.assert_close(out[..., 4:, :], ddim[..., 4:, :])
    assert (out[..., :4, :] - ddim[..., :4, :]).abs().mean() > 0.05
    ddpm = D.ddim_eta_step(ms, x, x0, eps, 3.0, 1.5, 1.0, torch.zeros_like(x))
    torch.testing.assert_close(ddpm, x0 + 1.5 * (1.5 / 3.0) * eps)     # eta 1: the DDPM posterior mean


# -- on tiny models -------------------------------------------------------------------------------------

def _snapshot(model):
    to = model.model_options.get("transformer_options", {})
    return (sorted(to.get("patches", {})), sorted(to.get("patches_replace", {})), sorted(model.object_patches),
            sorted(model.model_options.get("transformer_options", {}).get("wrappers", {})),
            len(getattr(model, "weight_wrappers", {}) or {}))


@pytest.mark.parametrize("reference, tol", [(False, 1e-5), (True, 2e-3)])
def test_zero_energy_reproduces_the_plain_reconstruction(tiny_eps, encode, reference, tol):
    """energy_scale 0 and a drag of length 0: the edit equals the source at every step, so the memory bank's
    keys/values change nothing and the result is the DDIM reconstruction of the inversion, computed here
    independently (inversion registry + Euler steps). With the memory bank's keys/values (each key then appears
    twice: the same attention) up to the float error of the other attention path."""
    from editkit.core import denoiser
    from editkit.samplers.branch_guider import BranchSpec, make_guider
    from editkit.samplers.inversion import invert
    from editkit.samplers.steps import euler_step
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pos = encode("a red circle")
    d = _drag((((20, 20), (20, 20)),), w=64, h=64)
    out, info = D.dragon_drag(tiny_eps, pos, None, lat, d, steps=6, cfg=1.0, energy_scale=0.0, reference=reference)
    assert info.guided == 0 and info.evaluations == 6
    sig = denoiser.schedule(tiny_eps, "normal", 6)
    inv = invert(tiny_eps, lat, pos, None, 1.0, sig, "ddim")
    g = make_guider(tiny_eps, {"positive": pos}, 1.0)
    spec = BranchSpec("positive", None, 1.0)

    def program(gd, s, extra, *_):
        x = inv.latents[0].clone()
        for i in range(len(s) - 1):
            x = euler_step(x, gd.x0(x, s[i], spec, extra["model_options"]), s[i], s[i + 1])
        return x
    ref = g.run(program, sig, lat.shape)
    torch.testing.assert_close(out, ref, atol=tol * ref.abs().max(), rtol=tol)


def test_guidance_changes_only_what_it_should(tiny_eps, encode):
    """DiffEditor on a tiny model: guided evaluations, roll-backs and regional SDE steps happen on the paper's
    schedule, the result is finite and differs from the unguided one, the model gets no patches."""
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    pos = encode("a red circle")
    d = _drag((((16, 16), (40, 24)),), w=64, h=64)
    before = _snapshot(tiny_eps)
    out, info = D.dragon_drag(tiny_eps, pos, None, lat, d, steps=10, cfg=1.0, energy_scale=1.0, diffeditor=True,
                              guide_until=1.0, time_travel=1)
    base, _ = D.dragon_drag(tiny_eps, pos, None, lat, d, steps=10, cfg=1.0, energy_scale=0.0)
    # thirds (3 steps) of 10 guided steps: 0-2 every step, then every other step (4, 6, 8); regional SDE on 3-5;
    # one roll-back (a second guided pass) on 6 and on 8
    assert info.guided == 3 + 1 + 2 + 2 and info.rollbacks == 2 and info.sde_steps == 3
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-3)
    assert _snapshot(tiny_eps) == before


def test_interrupted_drag_leaves_model_and_inputs_untouched(tiny_eps, encode):
    import comfy.model_management as mm
    from editkit.nodes.drag import DiffEditor, DragonDiffusion
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    keep = lat.clone()
    pos = encode("a red circle")
    d = _drag((((16, 16), (40, 24)),), w=64, h=64)
    before = _snapshot(tiny_eps)
    calls = []

    def progress(n, x0):           # the user presses Cancel after the second step, mid-guidance
        calls.append(n)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            D.dragon_drag(tiny_eps, pos, None, lat, d, steps=8, cfg=1.0, energy_scale=1.0, diffeditor=True, progress=progress)
        assert len(calls) == 2
        for node in (DragonDiffusion, DiffEditor):             # through the nodes: Cancel before the run
            mm.interrupt_current_processing(True)
            args = (tiny_eps, pos, {"samples": lat}, d, 6, 6, 1.0, 1.0, 4.0, 6.0, 0.2, 0.6, True)
            args = args + ((0.4, 2, 0) if node is DiffEditor else (0,))
            with pytest.raises(mm.InterruptProcessingException):
                node.execute(*args)
    finally:
        mm.interrupt_current_processing(False)
    assert _snapshot(tiny_eps) == before
    assert torch.equal(lat, keep) and d.pairs == (((16, 16), (40, 24)),)
    out, _ = D.dragon_drag(tiny_eps, pos, None, lat, d, steps=4, cfg=1.0, energy_scale=1.0)   # runs again afterwards
    assert torch.isfinite(out).all()


def test_node_bad_input(tiny_eps, encode):
    from editkit.nodes.drag import DiffEditor, DragonDiffusion
    pos, lat = encode("a red circle"), {"samples": torch.zeros(1, 4, 16, 16)}
    base = dict(steps=10, inversion_steps=10, cfg=1.0, energy_scale=2.0, w_edit=4.0, w_content=6.0, w_inpaint=0.2,
                guide_until=0.6, visual_cross_attention=True, seed=0)
    with pytest.raises(ValueError, match="EditKitDragonDiffusion: input 'negative'.*cfg 4"):
        DragonDiffusion.execute(tiny_eps, pos, lat, _drag(), **{**base, "cfg": 4.0})
    with pytest.raises(ValueError, match="EditKitDragonDiffusion: input 'inversion_steps'"):
        DragonDiffusion.execute(tiny_eps, pos, lat, _drag(), **{**base, "inversion_steps": 20})
    with pytest.raises(ValueError, match="EditKitDragonDiffusion: input 'energy_scale'"):
        DragonDiffusion.execute(tiny_eps, pos, lat, _drag(), **{**base, "energy_scale": -1.0})
    with pytest.raises(ValueError, match="EditKitDiffEditor: input 'drag'.*no handle/target"):
        DiffEditor.execute(tiny_eps, pos, lat, _drag(()), sde_strength=0.4, time_travel=2, **base)
    with pytest.raises(ValueError, match="EditKitDiffEditor: input 'latent'.*channels"):
        DiffEditor.execute(tiny_eps, pos, {"samples": torch.zeros(1, 16, 16, 16)}, _drag(), sde_strength=0.4,
                           time_travel=2, **base)


# -- the toy world ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_triple():
    from editkit.builtin_models import toy
    return toy.load_toy_cached()


@pytest.mark.parametrize("node_id", ["EditKitDragonDiffusion", "EditKitDiffEditor"])
def test_object_follows_the_drag_on_the_toy_model(toy_triple, node_id):
    """A toy-world drag case (a triangle dragged 38 px left): without energy guidance it stays where it was; with
    it the scorer reads it at its target (within the drag tolerance), look kept, the other object in place."""
    from scipy.ndimage import binary_dilation
    from editkit.nodes.drag import DiffEditor, DragonDiffusion
    from editkit.toyworld import editbench
    model, clip, vae = toy_triple
    ctx = editbench.EditContext(model, clip, vae)
    case = editbench.drag_cases(1, min_shift=16, max_shift=40)[0]
    m = case.source.masks()[case.index] | case.target.masks()[case.index]
    d = DragPoints(128, 128, ((case.handle, case.goal),)).with_mask(torch.from_numpy(binary_dilation(m, iterations=4)).float())
    node = DiffEditor if node_id == "EditKitDiffEditor" else DragonDiffusion
    extra = {"sde_strength": 0.4, "time_travel": 2} if node is DiffEditor else {}
    lat = {"samples": ctx.latent(case.source_image())}

    def run(energy):
        (out,) = node_out(node.execute(model, ctx.encode(case.source_prompt), lat, d, steps=20, inversion_steps=14, cfg=1.0,
                                       energy_scale=energy, w_edit=4.0, w_content=6.0, w_inpaint=0.2, guide_until=0.6,
                                       visual_cross_attention=True, seed=42, **extra))
        return case.score(ctx.decode(out["samples"]).numpy())
    plain, guided = run(0.0), run(1.0)
    assert not plain.ok
    assert guided.ok, guided.why
    assert guided.centroid_error < plain.centroid_error and guided.preserve_psnr > 20


@pytest.mark.slow
def test_sd15_full_reads_decoder_levels_2_and_3(sd15_full):
    """On the SD1.5 layout the energy reads decoder levels 2 and 3 (the outputs of output blocks 5 and 8, 1280
    and 640 channels); a gradient run at full size is left to the toy model (minutes on CPU)."""
    pts = D.feature_points(sd15_full)
    assert [(p.key, p.channels) for p in pts] == [(("output", 5), 1280), (("output", 8), 640)]
