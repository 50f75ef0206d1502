"""Local editing (issue 14): DiffEdit's automatic mask and masked decoding in EditKit's inversion sampler.

The mask is checked against an independent computation of the noise difference (the model called once per
prompt and draw, outside the branch contract's batching), and against a constructed denoiser whose prediction
depends on the prompt only inside a known region (the mask must find that region, for EPS, v and flow).
Masked decoding is checked on the pixel-local analytic denoiser (tests/ek_inversion_helpers.py): outside the
mask the edit IS the source, inside it IS the unmasked edit, and a pixel of strength 1/2 IS the edit that
starts half-way along the replay.
"""
import pytest
import torch

from editkit.core import denoiser as D
from editkit.core.errors import EditKitInputError
from editkit.core.patches import SharedPatch
from editkit.local import diffedit, masks
from editkit.nodes.editing import DiffEditMask
from editkit.nodes.inversion import Invert, InversionSampler
from editkit.samplers.methods.base import ReplayHook
from ek_inversion_helpers import analytic_model, latent, node_out

SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


def _mask_node(model, lat, ref, qry, image=None, n=3, ratio=0.5, threshold=0.5, dilate=0, blur=0.0, seed=0):
    out = DiffEditMask.execute(model, {"samples": lat}, ref, qry, n, ratio, threshold, dilate, blur, seed, image=image)
    return node_out(out)[0], out


class RegionDenoiser(SharedPatch):
    """x0 = 0.5 x + region * p(c): the prompt moves the prediction inside `region` only (any parameterization)."""

    def __init__(self, region: torch.Tensor):
        self.region = region

    def __call__(self, apply_model, args):
        x, c = args["input"], args["c"]["c_crossattn"]
        # a fixed projection of the text tokens: differs clearly between the two prompts (their plain means are
        # both ~0, the tiny CLIP's final layer norm, so the difference would be rounding noise alone)
        proj = torch.randn(c.shape[-1], generator=torch.Generator().manual_seed(0)).to(c.device)
        p = (c.float() @ proj).mean(dim=1).view(-1, 1, 1, 1) * 10.0
        return 0.5 * x + self.region.to(x) * p.to(x)


def test_mask_finds_the_region_where_the_prompt_acts(tiny_any, encode):
    region = torch.zeros(1, 1, 8, 8)
    region[..., 1:5, 2:7] = 1.0
    m = tiny_any.clone()
    m.set_model_unet_function_wrapper(RegionDenoiser(region))
    mask, out = _mask_node(m, latent(3), encode(SOURCE), encode(TARGET), n=2)
    assert tuple(mask.shape) == (1, 64, 64)
    gt = torch.nn.functional.interpolate(region, size=(64, 64), mode="nearest")[0, 0]
    inter = float((mask[0] * gt).sum())
    union = float(((mask[0] + gt) > 0).float().sum())
    assert inter / union > 0.9                      # bilinear upsampling rounds the region's corners
    assert float(mask[0][masks.dilate(gt[None], 8)[0] == 0].sum()) == 0.0   # nothing beyond one latent pixel
    # the node shows the mask and its cost (2 n model evaluations in n batched calls)
    assert "images" in out.ui and "4 model evaluations in 2 batched calls" in out.ui["text"][0]


def test_noise_difference_equals_an_independent_computation(tiny_eps, encode):
    """Batched branch evaluation == the model called per prompt and per draw, mean |x0_Q - x0_R| over channels."""
    lat = latent(5)
    ref, qry = encode(SOURCE), encode(TARGET)
    dmap = diffedit.noise_difference(tiny_eps, lat, ref, qry, n=3, ratio=0.5, seed=11)
    ms = tiny_eps.get_model_object("model_sampling")
    sigma = D.sigma_at(ms, 0.5)
    x0 = tiny_eps.model.process_latent_in(lat.float())
    gen = torch.Generator().manual_seed(11)
    acc = torch.zeros(1, 8, 8)
    for _ in range(3):
        x = D.add_noise(ms, x0, torch.randn(x0.shape, generator=gen), sigma)
        a = D.predict_x0(tiny_eps, x, sigma, ref)
        b = D.predict_x0(tiny_eps, x, sigma, qry)
        acc += (b - a).abs().mean(dim=1)
    acc /= 3
    assert abs(dmap.sigma - sigma) < 1e-6 and dmap.evaluations == 3
    torch.testing.assert_close(dmap.raw, acc, rtol=1e-4, atol=1e-6)
    n = dmap.normalized
    assert float(n.min()) == 0.0 and abs(float(n.max()) - 1.0) < 1e-6


def test_mask_on_flow_at_ratio_one_and_on_a_dit(tiny_flow, tiny_flux, encode, tiny_clip):
    """sigma = 1 of a flow model (eps = x there): the x0 difference keeps the map defined; a DiT runs too."""
    mask, _ = _mask_node(tiny_flow, latent(1), encode(SOURCE), encode(TARGET), n=1, ratio=1.0, threshold=0.5)
    assert 0.0 < float(mask.mean()) < 1.0
    from ek_helpers import flow_cond
    mask, _ = _mask_node(tiny_flux, latent(1, channels=16), flow_cond(seed=1), flow_cond(seed=2), n=1)
    assert tuple(mask.shape) == (1, 64, 64) and 0.0 < float(mask.mean()) < 1.0


def test_dilate_and_blur():
    m = torch.zeros(1, 32, 32)
    m[:, 10:20, 10:20] = 1
    d = masks.dilate(m, 3)
    assert float(d.sum()) == 16 * 16 and float(d[0, 7, 7]) == 1 and float(d[0, 6, 6]) == 0
    b = masks.blur(m, 2.0)
    assert 0 < float(b[0, 10, 15]) < 1 and float(b[0, 15, 15]) > 0.97 and float(b[0, 0, 0]) < 1e-6
    assert abs(float(b.sum()) - float(m.sum())) < 1.0      # blurring moves mass, it does not make it


def test_diffedit_bad_inputs(tiny_eps, encode):
    ref, qry, lat = encode(SOURCE), encode(TARGET), latent(0)
    for ratio in (0.0, 1.5):
        with pytest.raises(EditKitInputError, match="encode_ratio.*(outside|below the minimum|above the maximum)"):
            _mask_node(tiny_eps, lat, ref, qry, ratio=ratio)
    with pytest.raises(EditKitInputError, match="'query'.*nothing to edit"):
        _mask_node(tiny_eps, lat, ref, ref, n=1)
    with pytest.raises(EditKitInputError, match="'image'.*expected 1 x 64 x 64"):
        _mask_node(tiny_eps, lat, ref, qry, image=torch.zeros(1, 32, 32, 3), n=1)
    with pytest.raises(EditKitInputError, match="'latent'.*latent channels"):
        _mask_node(tiny_eps, latent(0, channels=16), ref, qry, n=1)


# ---------------------------------------------------------------------------------------------
# Masked decoding
# ---------------------------------------------------------------------------------------------

def _edit(model, inv, positive, mask=None, sigmas_tail=None):
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    noise, guider, sampler, sigmas, lat = node_out(
        InversionSampler.execute(model, inv, positive, 1.0, "target", mask=mask))
    if sigmas_tail is not None:
        sigmas = sigmas[-(sigmas_tail + 1):]
    return node_out(SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat))[0]["samples"]


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_masked_decoding_is_source_outside_and_edit_inside(kind, tiny_eps, tiny_flow, encode):
    model = analytic_model(tiny_eps if kind == "eps" else tiny_flow, maps_scale=4.0)
    src_lat = latent(4)
    inv = node_out(Invert.execute(model, {"samples": src_lat}, encode(SOURCE), 1.0, 6, "normal", 0))[1]
    free = _edit(model, inv, encode(TARGET))
    strength = torch.zeros(1, 8, 8)
    strength[:, :, :3] = 1.0        # edited
    strength[:, :, 3:5] = 0.5       # edited during the last half of the steps
    out = _edit(model, inv, encode(TARGET), mask=strength)
    source = inv.latents[-1]        # the stored clean source (user space after process_latent_out below)
    source = model.model.process_latent_out(source.float())
    late = _edit(model, inv, encode(TARGET), sigmas_tail=3)   # the unmasked edit started half-way
    assert float((free - source).abs()[..., :3].amax()) > 0.1                  # the edit does change the image
    torch.testing.assert_close(out[..., 5:], source[..., 5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., :3], free[..., :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., 3:5], late[..., 3:5], rtol=1e-5, atol=1e-5)


def test_mask_input_sizes_and_errors(tiny_eps, encode):
    inv = node_out(Invert.execute(tiny_eps, {"samples": latent(0)}, encode(SOURCE), 1.0, 2, "normal", 0))[1]
    pos = encode(TARGET)
    pixel = torch.zeros(1, 64, 64)
    pixel[:, :32] = 1
    hook = node_out(InversionSampler.execute(tiny_eps, inv, pos, 1.0, "target", mask=pixel))[2].hooks[0]
    expect = torch.zeros(1, 1, 8, 8)
    expect[..., :4, :] = 1
    assert torch.equal(hook.strength, expect)       # image size -> latent size by area
    with pytest.raises(EditKitInputError, match="'mask'.*48x48 mask does not fit a 64x64 image.*latent 8x8"):
        InversionSampler.execute(tiny_eps, inv, pos, 1.0, "target", mask=torch.ones(1, 48, 48))
    with pytest.raises(EditKitInputError, match="'mask'.*3 masks for a latent batch of 1"):
        InversionSampler.execute(tiny_eps, inv, pos, 1.0, "target", mask=torch.ones(3, 8, 8))
    with pytest.raises(EditKitInputError, match="'mask'.*empty: nothing to edit"):
        InversionSampler.execute(tiny_eps, inv, pos, 1.0, "target", mask=torch.zeros(1, 64, 64))


@pytest.mark.slow
def test_sd15_full_mask(sd15_full):
    """The full-size SD1.5 UNet (host compute dtype, 32x32 latent, one draw): DiffEdit's batched noise difference
    equals the per-prompt computation. (Masked decoding is model-agnostic latent blending: tiny-model tests.)"""
    from editkit.builtin_models.fullsize import sd15_conditioning
    ref, qry = sd15_conditioning(), sd15_conditioning(seed=2)
    lat = latent(7, hw=32)
    dmap = diffedit.noise_difference(sd15_full, lat, ref, qry, n=1, ratio=0.5, seed=3)
    ms = sd15_full.get_model_object("model_sampling")
    sigma = D.sigma_at(ms, 0.5)
    x0 = sd15_full.model.process_latent_in(lat.float())
    x = D.add_noise(ms, x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)), sigma)
    want = (D.predict_x0(sd15_full, x, sigma, qry).float() - D.predict_x0(sd15_full, x, sigma, ref).float()).abs().mean(1)
    torch.testing.assert_close(dmap.raw, want.cpu(), rtol=2e-3, atol=2e-3 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# RePaint resampling (replay hooks plan / on_jump)
# ---------------------------------------------------------------------------------------------

def test_repaint_plan():
    from editkit.local.blend import RePaint
    assert RePaint(2, 2).plan(None, [0, 1, 2, 3, 4, 5]) == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    assert RePaint(3, 2).plan(None, [2, 3, 4, 5, 6]) == [2, 3, 4, 2, 3, 4, 5, 6, 5, 6]
    assert RePaint(4, 1).plan(None, [0, 1, 2]) == [0, 1, 2]


def test_renoise_matches_the_forward_process(tiny_eps, tiny_flow):
    for model in (tiny_eps, tiny_flow):
        ms = model.get_model_object("model_sampling")
        x0, e1, e2 = latent(1), latent(2), latent(3)
        lo, hi = 0.4, 0.8 if D.space(ms) == "flow" else 3.0
        x = D.renoise(ms, D.add_noise(ms, x0, e1, lo), lo, hi, e2)
        # x = a x0 + c (noise of std hi): the clean part scaled like add_noise at hi, the noise variance hi^2
        a = (1 - hi) if D.space(ms) == "flow" else 1.0
        c1 = (a / (1 - lo) * lo) if D.space(ms) == "flow" else lo
        c2 = (hi * hi - c1 * c1) ** 0.5
        torch.testing.assert_close(x - a * x0, c1 * e1 + c2 * e2, rtol=1e-5, atol=1e-5)
        assert abs(c1 * c1 + c2 * c2 - hi * hi) < 1e-9


def _count_calls(inner, calls):
    def wrapper(apply_model, args):
        calls.append(args["input"].shape[0])
        return inner(apply_model, args)
    return wrapper


class _Visits(ReplayHook):
    """Records the replayed step indices (test helper; per-run state in ctx.stats)."""

    def on_step(self, ctx, step, state):
        ctx.stats.setdefault("visits", []).append(step.index)
        return state


def test_repaint_in_masked_decoding_keeps_the_source_outside(tiny_eps, encode):
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    from editkit.local.blend import RePaint
    from editkit.nodes.editing import RePaint as RePaintNode
    from editkit.samplers.replay import InversionReplaySampler
    model, calls = analytic_model(tiny_eps, maps_scale=4.0), []
    model.set_model_unet_function_wrapper(_count_calls(model.model_options["model_function_wrapper"], calls))
    inv = node_out(Invert.execute(model, {"samples": latent(4)}, encode(SOURCE), 1.0, 6, "normal", 0))[1]
    strength = torch.zeros(1, 8, 8)
    strength[:, 2:6, 2:6] = 1.0
    noise, guider, sampler, sigmas, lat = node_out(
        InversionSampler.execute(model, inv, encode(TARGET), 1.0, "source + target", mask=strength))
    sampler = node_out(RePaintNode.execute(InversionReplaySampler(inv, "source + target", sampler.hooks + (_Visits(),)),
                                           2, 2, 1))[0]
    assert isinstance(sampler.hooks[-1], RePaint) and (sampler.hooks[-1].jump, sampler.hooks[-1].resamples) == (2, 2)
    calls.clear()
    out = node_out(SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat))[0]["samples"]
    # every step of the 6 is run twice (blocks of 2): 12 steps, 3 jumps back; one batched model call per step
    assert guider.replay_stats["visits"] == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    assert guider.replay_stats["repaint_jumps"] == 3
    assert len(calls) == 12
    tgt = out[1:]
    src = model.model.process_latent_out(inv.latents[-1].float())      # the stored clean source
    keep = (strength == 0)[0]
    torch.testing.assert_close(tgt[..., keep], src[..., keep], rtol=0, atol=1e-5)     # outside: the source
    assert float((tgt - src)[..., ~keep].abs().max()) > 1e-2                          # inside: edited


def test_repaint_node_errors(tiny_eps, encode):
    from editkit.nodes.editing import RePaint as RePaintNode
    inv = node_out(Invert.execute(tiny_eps, {"samples": latent(0)}, encode(SOURCE), 1.0, 2, "normal", 0))[1]
    unmasked = node_out(InversionSampler.execute(tiny_eps, inv, encode(TARGET), 1.0, "target"))[2]
    with pytest.raises(EditKitInputError, match="'sampler'.*has no mask.*connect a MASK"):
        RePaintNode.execute(unmasked, 10, 10, 0)
    with pytest.raises(EditKitInputError, match="'sampler'.*not the sampler of an EditKit Inversion Sampler"):
        RePaintNode.execute(object(), 10, 10, 0)
    masked = node_out(InversionSampler.execute(tiny_eps, inv, encode(TARGET), 1.0, "target",
                                               mask=torch.ones(1, 8, 8)))[2]
    once = node_out(RePaintNode.execute(masked, 10, 10, 0))[0]
    assert len(masked.hooks) == 1                   # the input sampler is not changed
    with pytest.raises(EditKitInputError, match="'sampler'.*already resamples"):
        RePaintNode.execute(once, 10, 10, 0)
