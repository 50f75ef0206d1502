"""EditKitBlendedLatent (Blended Latent Diffusion as a model patch for plain samplers, issue 14).

On a real KSampler img2img run (comfy.sample.sample, Euler): at EVERY step the latent outside the mask equals
the source noised to that step's sigma with the sampler's own noise (computed here with core.denoiser.add_noise),
the result outside the mask IS the source, inside it is edited; a soft pixel follows the source until its
strength's share of the steps is left (Differential-Diffusion style). EPS and flow models.
"""
import comfy.sample
import comfy.samplers
import pytest
import torch

from editkit.core import denoiser as D
from editkit.core.errors import EditKitInputError
from editkit.nodes.editing import BlendedLatent
from ek_inversion_helpers import latent, node_out


def _run(model, src, pos, neg, steps=6, denoise=1.0, seed=3):
    noise = comfy.sample.prepare_noise(src, seed)
    seen = []
    out = comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", pos, neg, src, denoise=denoise,
                              callback=lambda i, x0, x, total: seen.append(x.clone().cpu()), disable_pbar=True, seed=seed)
    return out, noise, seen


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_outside_the_mask_is_the_noised_source_at_every_step(kind, tiny_eps, tiny_flow, encode):
    base = tiny_eps if kind == "eps" else tiny_flow
    src = latent(5)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 1:5] = 1.0
    mask[:, 0, 6:] = 0.5                 # soft: edited during the last half of the steps
    m = node_out(BlendedLatent.execute(base, {"samples": src}, mask))[0]
    out, noise, seen = _run(m, src, encode("a blue circle"), encode(""), denoise=0.75)   # img2img
    ms = base.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 8).cpu()[-7:]     # KSampler's schedule at denoise 0.75
    x0 = base.model.process_latent_in(src.float())
    outside = (mask == 0)[0]
    assert len(seen) == 6
    for i, x in enumerate(seen):
        want = D.add_noise(ms, x0, noise.float(), sigmas[i])
        torch.testing.assert_close(x[..., outside], want[..., outside], rtol=0, atol=1e-4)
        if i <= 3:                       # the soft pixels stay on the source during the first half (+ 1 step)
            torch.testing.assert_close(x[..., 0, 6:], want[..., 0, 6:], rtol=0, atol=1e-4)
    torch.testing.assert_close(out[..., outside], src[..., outside], rtol=0, atol=1e-4)
    inside = (mask == 1)[0]
    assert float((out - src)[..., inside].abs().max()) > 1e-2       # the masked region is sampled


def test_blended_latent_bad_inputs(tiny_eps, encode):
    src = latent(0)
    with pytest.raises(EditKitInputError, match="'mask'.*48x48 mask does not fit"):
        BlendedLatent.execute(tiny_eps, {"samples": src}, torch.ones(1, 48, 48))
    with pytest.raises(EditKitInputError, match="'mask'.*nothing to edit"):
        BlendedLatent.execute(tiny_eps, {"samples": src}, torch.zeros(1, 64, 64))
    with pytest.raises(EditKitInputError, match="'source'.*latent channels"):
        BlendedLatent.execute(tiny_eps, {"samples": latent(0, channels=16)}, torch.ones(1, 8, 8))
