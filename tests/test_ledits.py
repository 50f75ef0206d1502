"""LEDITS++ (issue 14): edit-friendly DDPM inversion + SEGA-style edit terms inside implicit masks.

Properties: with scale 0 the edit IS the reconstruction (the DDPM noise maps replayed exactly); on a pixel-local
denoiser (the analytic one of ek_inversion_helpers, run after the real tiny UNet so its cross-attention maps are
captured) every pixel outside the union of the implicit masks IS the reconstruction; the implicit mask of a step
equals an independent computation (the model called once per prompt, the attention map read by a separate
capture, smoothing / quantiles written out here); all edits are branches of one batched call per step.
"""
import pytest
import torch
import torch.nn.functional as F

from editkit.attention.maps import CrossAttentionMapStore, blend_level, install_capture
from editkit.core import denoiser as D
from editkit.core.errors import EditKitInputError
from editkit.core.introspect import attention_layout
from editkit.local import ledits
from editkit.nodes.editing import LEDITS
from editkit.nodes.inversion import DDPMInversion, Invert
from ek_inversion_helpers import AnalyticDenoiser, latent, node_out

SOURCE = "a red circle on a white background"


def _invert(model, encode, steps=4, skip=0, cfg=1.0, seed=0, lat=None):
    neg = encode("") if cfg != 1.0 else None
    lat = latent(3) if lat is None else lat
    return node_out(DDPMInversion.execute(model, {"samples": lat}, encode(SOURCE), cfg, steps, "normal", skip, seed,
                                          negative=neg))[1]


def _ledits(model, clip, inv, edits, scale=5.0, threshold=0.9, warmup=0, masks="intersect", output="source + target"):
    out = LEDITS.execute(model, clip, inv, edits, scale, threshold, warmup, masks, output)
    lat, mask = node_out(out)
    return lat["samples"], mask, out


def test_zero_scale_reconstructs_exactly(tiny_any, tiny_clip, encode):
    tiny_eps = tiny_any                                  # EPS, v-prediction and flow
    inv = _invert(tiny_eps, encode, steps=5, skip=1, cfg=3.5)
    both, mask, _ = _ledits(tiny_eps, tiny_clip, inv, "+ a blue square\n- a red circle", scale=0.0)
    clean = tiny_eps.model.process_latent_out(inv.latents[-1].float())
    torch.testing.assert_close(both[1:], clean, rtol=0, atol=1e-4)      # the edit == the stored source (the exact-
    # inversion bound of tests/test_inversion_exact.py: rounding of the batched evaluation)
    torch.testing.assert_close(both[:1], clean, rtol=0, atol=1e-4)
    assert float(mask.abs().max()) == 0.0
    edited, _, _ = _ledits(tiny_eps, tiny_clip, inv, "+ a blue square\n- a red circle", scale=5.0)
    assert float((edited[1:] - clean).abs().max()) > 1e-3                # a non-zero scale does edit


class LocalDenoiser(AnalyticDenoiser):
    """Runs the real UNet (its cross-attention maps are captured) and returns the pixel-local analytic x0."""

    def __call__(self, apply_model, args):
        apply_model(args["input"], args["timestep"], **args["c"])
        return super().__call__(apply_model, args)


@pytest.mark.parametrize("masks", ["intersect", "attention"])
def test_outside_the_implicit_masks_the_edit_is_the_reconstruction(masks, tiny_eps, tiny_clip, encode):
    m = tiny_eps.clone()
    m.set_model_unet_function_wrapper(LocalDenoiser(False, maps_scale=4.0))
    inv = _invert(m, encode, steps=6, cfg=1.0)
    both, mask, _ = _ledits(m, tiny_clip, inv, "+ a blue square : 8", threshold=0.8, masks=masks)
    src, tgt = both[:1], both[1:]
    union = mask[0, ::8, ::8] > 0                       # the average over steps is > 0 where any step masked
    assert 0 < int(union.sum()) < 64
    diff = (tgt - src).abs().amax(dim=1)[0]
    assert float(diff[~union].max()) < 1e-5             # never masked: exactly the reconstruction
    assert float(diff[union].max()) > 1e-2              # masked pixels were edited


def _quantile_mask(v: torch.Tensor, q: float) -> torch.Tensor:
    """Written out: the q quantile with linear interpolation between the sorted values."""
    s = torch.sort(v.flatten()).values
    pos = q * (s.numel() - 1)
    lo, frac = int(pos), pos - int(pos)
    thr = s[lo] + frac * (s[min(lo + 1, s.numel() - 1)] - s[lo])
    return (v >= thr).float()


def _smooth(a: torch.Tensor) -> torch.Tensor:
    g = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / 0.5) ** 2)
    k = torch.outer(g, g) / torch.outer(g, g).sum()
    return F.conv2d(F.pad(a[None, None], (1, 1, 1, 1), mode="reflect"), k[None, None])[0, 0]


def test_implicit_mask_equals_an_independent_computation(tiny_eps, tiny_clip, encode):
    """One edited step (skip = steps - 1): its latent is the stored one, so the mask can be recomputed."""
    inv = _invert(tiny_eps, encode, steps=4, skip=3, cfg=1.0, lat=latent(8))
    concept, scale, thr = "a blue square", 6.0, 0.75
    _, mask, _ = _ledits(tiny_eps, tiny_clip, inv, f"- {concept} : {scale}", threshold=thr)
    got = mask[0, ::8, ::8]
    x = inv.latents[3].float()
    sigma = float(inv.sigmas[3])
    level = blend_level(attention_layout(tiny_eps))
    toks = tiny_clip.tokenize(concept)["l"][0]
    positions = [i for i, (t, _) in enumerate(toks) if t not in (49406, 49407)]
    store = CrossAttentionMapStore({"c": positions}, frozenset({level}))
    cap = tiny_eps.clone()
    install_capture(cap, store)
    x0_c = D.predict_x0(cap, x, sigma, encode(concept))
    amap = store.raw(level)[0, 0]
    x0_u = D.predict_x0(tiny_eps, x, sigma, encode(""))
    gamma = -scale * (x0_u - x0_c) / sigma              # remove: -(d_c - d_u), d = (x - x0) / sigma
    m1 = F.interpolate(_quantile_mask(_smooth(amap.float()), thr)[None, None], size=(8, 8), mode="nearest")[0, 0]
    m2 = _quantile_mask(gamma.abs().sum(dim=1)[0], thr)
    want = m1 * m2
    assert 0 < float(want.sum()) < 64
    assert torch.equal(got, want)


def test_several_edits_in_one_batched_call_per_step(tiny_eps, tiny_clip, encode):
    rows = []

    class Count:
        def __call__(self, apply_model, args):
            rows.append(args["input"].shape[0])
            return apply_model(args["input"], args["timestep"], **args["c"])
    m = tiny_eps.clone()
    m.set_model_unet_function_wrapper(Count())
    inv = _invert(m, encode, steps=5, skip=2, cfg=3.5)
    rows.clear()
    _, mask, out = _ledits(m, tiny_clip, inv, "+ a blue square\n- a red circle [circle] : 3", warmup=1)
    # 3 replay steps; the first (warm-up) only source + target, then + 2 concepts; x2 for the uncond rows
    assert rows == [4, 8, 8]
    assert tuple(mask.shape) == (2, 64, 64)
    assert "2 edit(s)" in out.ui["text"][0] and "images" in out.ui


def test_ledits_bad_inputs(tiny_eps, tiny_clip, encode):
    inv = _invert(tiny_eps, encode, steps=2)
    cases = [("+ a blue square [hat]", "'edits'.*'hat' is not in the concept of edit 1"),
             ("+ ", "'edits'.*empty concept"),
             ("+ a blue square : 80", "'edits'.*scale 80 is outside"),
             ("+ a blue square : much", "'edits'.*not a number"),
             ("a blue square", "'edits'.*does not start with \\+ or -"),
             ("\n  \n", "'edits'.*no edit given"),
             ("+ a blue square []", "'edits'.*mask words.*empty")]
    for text, pattern in cases:
        with pytest.raises(EditKitInputError, match=pattern):
            _ledits(tiny_eps, tiny_clip, inv, text)
    ddim = node_out(Invert.execute(tiny_eps, {"samples": latent(0)}, encode(SOURCE), 1.0, 2, "normal", 0))[1]
    with pytest.raises(EditKitInputError, match="'inversion'.*edit-friendly DDPM"):
        _ledits(tiny_eps, tiny_clip, ddim, "+ a blue square")


def test_parse_edits():
    e = ledits.parse_edits("+ a blue square [square] : 7\n# a comment\n- a red circle", 5.0, "N")
    assert e == [ledits.Edit("a blue square", False, 7.0, ("square",)), ledits.Edit("a red circle", True, 5.0, ())]


def test_unmasked_caption_edit_is_the_prompt_swap(tiny_eps, tiny_clip, encode):
    """An independent reference for the edit term's sign, its base, its row and the reuse of the DDPM noise maps:
    with every implicit mask the whole image (threshold 0), '- source caption' and '+ target caption' at scale s
    give d_base + s (d_tgt - d_u) - s (d_src - d_u), and with s = the inversion's cfg that IS the plain replay of the
    same inversion with the target caption at that cfg (EditKit Inversion Sampler, no LEDITS++ code involved)."""
    from ek_inversion_helpers import edit
    target = "a blue square on a white background"
    inv = _invert(tiny_eps, encode, steps=5, skip=1, cfg=3.5)
    got, _, _ = _ledits(tiny_eps, tiny_clip, inv, f"- {SOURCE} : 3.5\n+ {target} : 3.5", threshold=0.0, output="target")
    want, _ = edit(tiny_eps, inv, encode(target), encode(""), cfg=3.5, output="target")
    recon = tiny_eps.model.process_latent_out(inv.latents[-1].float())
    assert float((want - recon).abs().max()) > 1e-2                    # the swap does change the image
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    flipped, _, _ = _ledits(tiny_eps, tiny_clip, inv, f"+ {SOURCE} : 3.5\n- {target} : 3.5", threshold=0.0, output="target")
    assert float((flipped - want).abs().max()) > 1e-2                  # the signs matter


@pytest.fixture(scope="module")
def tiny_sd3():
    from editkit.builtin_models import tiny
    return tiny.tiny_sd3(seed=0)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_ledits_on_dits(arch, tiny_flux, tiny_sd3, tiny_clip, encode):
    """The mechanism transfers to DiTs (joint attention: the concept's text-token maps at the token grid): scale 0
    IS the replay, and on a pixel-local denoiser run after the real DiT (whose maps are captured) the edit
    changes the image only inside the implicit masks."""
    model = tiny_flux if arch == "flux" else tiny_sd3
    lat = latent(3, channels=16)
    inv = _invert(model, encode, steps=4, skip=1, cfg=1.0, lat=lat)
    both, mask, _ = _ledits(model, tiny_clip, inv, "+ a blue square\n- a red circle [circle]", scale=0.0)
    clean = model.model.process_latent_out(inv.latents[-1].float())
    torch.testing.assert_close(both, torch.cat([clean, clean]), rtol=0, atol=1e-4)
    m = model.clone()
    m.set_model_unet_function_wrapper(LocalDenoiser(True, channels=16, maps_scale=4.0))
    inv = _invert(m, encode, steps=4, cfg=1.0, lat=lat)
    both, mask, _ = _ledits(m, tiny_clip, inv, "+ a blue square : 8", threshold=0.8)
    union = mask[0, ::8, ::8] > 0
    assert 0 < int(union.sum()) < 64
    diff = (both[1:] - both[:1]).abs().amax(dim=1)[0]
    assert float(diff[~union].max()) < 1e-5 and float(diff[union].max()) > 1e-2
