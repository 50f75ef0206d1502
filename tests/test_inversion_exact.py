"""Exact-by-construction inversions (EDICT, edit-friendly DDPM, Direct Inversion): the source image comes
back to <= 1e-4 max abs error in the model's (sampler-space) latent, fp32 models, on the tiny EPS, v-pred
and flow UNets, both from the method's own replay (source branch alone) and from the source branch of
EditKitInversionSampler running source + target in one batch."""
import pytest
import torch

from editkit.nodes.inversion import DDPMInversion, DirectInversion, EDICT, Invert
from editkit.samplers.replay import reconstruct
from ek_inversion_helpers import edit, latent, node_out, sampler_space_error

TOL = 1e-4
SOURCE, TARGET = "a red circle on a white background", "a blue square on a black background"


def _invert(method, model, lat, pos, neg, steps=12):
    if method == "edict":
        return node_out(EDICT.execute(model, {"samples": lat}, pos, 3.0, 0.93, steps, "normal", negative=neg))[1]
    if method == "ddpm":
        return node_out(DDPMInversion.execute(model, {"samples": lat}, pos, 3.5, steps, "normal", 3, 5, negative=neg))[1]
    inv = node_out(Invert.execute(model, {"samples": lat}, pos, 1.0, steps, "normal", 0))[1]
    return node_out(DirectInversion.execute(inv))[0]


@pytest.mark.parametrize("method", ["edict", "ddpm", "direct"])
def test_exact_reconstruction(tiny_any, encode, method):
    pos, neg, tgt = encode(SOURCE), encode(""), encode(TARGET)
    lat = latent(3)
    inv = _invert(method, tiny_any, lat, pos, neg)
    if method != "direct":   # the method's own sampler, source branch alone (no correction at all)
        rec = reconstruct(tiny_any, inv)
        assert sampler_space_error(tiny_any, rec, lat) <= TOL
    out, guider = edit(tiny_any, inv, tgt, neg, cfg=7.5)
    assert out.shape[0] == 2
    assert sampler_space_error(tiny_any, out[:1], lat) <= TOL
    # the target branch was really edited
    assert sampler_space_error(tiny_any, out[1:], lat) > 1e-3
    if method != "direct":
        # for EDICT/DDPM the batched source branch only needs a rounding-level correction onto the trajectory
        assert guider.source_drift < 1e-3


def test_edict_pair_and_mixing(tiny_v, encode):
    """Both coupled sequences are stored; the inversion is exactly undone step by step with any mix p."""
    pos, neg = encode(SOURCE), encode("")
    lat = latent(4)
    for mix in (0.93, 0.7):
        inv = node_out(EDICT.execute(tiny_v, {"samples": lat}, pos, 3.0, mix, 6, "normal", negative=neg))[1]
        assert len(inv.pair) == len(inv.latents) == 7 and inv.stats["nfe"] == 12
        assert sampler_space_error(tiny_v, reconstruct(tiny_v, inv), lat) <= TOL
        assert not torch.equal(inv.latents[0], inv.pair[0])


def test_ddpm_noise_maps_and_skip(tiny_eps, encode):
    pos, neg = encode(SOURCE), encode("")
    lat = latent(5)
    start, inv, maps = node_out(DDPMInversion.execute(tiny_eps, {"samples": lat}, pos, 3.5, 10, "normal", 4, 7, negative=neg))
    assert maps["samples"].shape == (10, 4, 8, 8)
    # z_t * posterior std is what each replayed step adds; the last step has no noise (raw correction)
    assert inv.noise_std[-1] == 0.0 and all(s > 0 for s in inv.noise_std[:-1])
    for i in range(9):
        torch.testing.assert_close(maps["samples"][i:i + 1].double() * inv.noise_std[i], inv.residuals[i].double())
    assert inv.start_index == 4
    torch.testing.assert_close(tiny_eps.model.process_latent_in(start["samples"]), inv.latents[4].float())
    # any later start replays exactly too (a tail of the sigmas)
    out, _ = edit(tiny_eps, inv, pos, neg, cfg=3.5, sigmas_tail=3)
    assert sampler_space_error(tiny_eps, out[:1], lat) <= TOL
    # a new seed gives other noise maps, the same reconstruction
    inv2 = node_out(DDPMInversion.execute(tiny_eps, {"samples": lat}, pos, 3.5, 10, "normal", 4, 8, negative=neg))[1]
    assert not torch.allclose(inv2.residuals[0], inv.residuals[0])
    assert sampler_space_error(tiny_eps, reconstruct(tiny_eps, inv2), lat) <= TOL


def test_direct_inversion_costs_no_extra_evaluations(tiny_flow, encode):
    pos, neg, tgt = encode(SOURCE), encode(""), encode(TARGET)
    lat = latent(6)
    inv = node_out(Invert.execute(tiny_flow, {"samples": lat}, pos, 1.0, 8, "normal", 0))[1]
    direct = node_out(DirectInversion.execute(inv))[0]
    plain_out, g1 = edit(tiny_flow, inv, tgt, neg, cfg=5.0)
    direct_out, g2 = edit(tiny_flow, direct, tgt, neg, cfg=5.0)
    assert g1.evaluations == g2.evaluations == 8
    # the target branch is the same computation either way at the first step; the source is corrected
    assert sampler_space_error(tiny_flow, direct_out[:1], lat) <= TOL
    assert sampler_space_error(tiny_flow, plain_out[:1], lat) > TOL


def test_direct_inversion_rejects_exact_methods(tiny_eps, encode):
    inv = node_out(EDICT.execute(tiny_eps, {"samples": latent()}, encode(SOURCE), 1.0, 0.93, 2, "normal"))[1]
    with pytest.raises(ValueError, match="EditKitDirectInversion: input 'inversion'"):
        DirectInversion.execute(inv)
