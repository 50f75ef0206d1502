"""The inversion-method registry, the replay driver's hooks and the branch contract (core/branches.py):
what a new method, a replay hook (masked decoding, RePaint) and a cfg/post-CFG consumer build on."""
import os

import pytest
import torch

from editkit.core import branches as B
from editkit.nodes.inversion import DDPMInversion, EDICT, Invert, InversionSampler, NegativePromptInversion, RFInversion
from editkit.samplers.methods import ReplayHook, get_method, method_names
from editkit.samplers.methods.base import InversionMethod, Params, _REGISTRY, register
from editkit.samplers.methods.ode import DDIM, NPIParams, RFParams, euler_replay_step
from editkit.samplers.replay import InversionReplaySampler
from ek_inversion_helpers import latent, node_out, sampler_space_error

SOURCE, TARGET = "a red circle on a white background", "a blue square on a black background"
PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ddim(model, encode, steps=4, seed=2):
    return node_out(Invert.execute(model, {"samples": latent(seed)}, encode(SOURCE), 1.0, steps, "normal", 0))[1]


def _edit(model, inv, positive, hooks=(), cfg=1.0, negative=None, output="source + target"):
    """EditKitInversionSampler's guider with a sampler carrying extra replay hooks -> SamplerCustomAdvanced."""
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    noise, guider, _, sigmas, lat = node_out(InversionSampler.execute(model, inv, positive, cfg, output, negative=negative))
    sampler = InversionReplaySampler(inv, output, hooks)
    return node_out(SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat))[0]["samples"], guider


# ---------------------------------------------------------------------------------------------
# Registry and typed parameters
# ---------------------------------------------------------------------------------------------

def test_every_builtin_method_is_registered():
    assert set(method_names()) >= {"ddim", "npi", "nti", "edict", "ddpm", "rf"}
    for name in method_names():
        m = get_method(name)
        assert m.name == name and m.label and issubclass(m.Params, Params)
    assert {n for n in method_names() if get_method(n).direct_inversion} == {"ddim", "npi", "nti"}
    assert {n for n in method_names() if get_method(n).own_target_uncond} == {"npi", "nti"}
    with pytest.raises(ValueError, match="unknown inversion method 'nope'.*ddim"):
        get_method("nope")
    with pytest.raises(ValueError, match="taken"):
        register(type("Again", (DDIM,), {"name": "ddim"}))


def test_params_round_trip_through_settings(tiny_eps, tiny_flow, encode):
    """What a node stores in settings is what the replay reads back, typed, with the defaults elsewhere."""
    pos, lat = encode(SOURCE), {"samples": latent(1)}
    npi = node_out(NegativePromptInversion.execute(tiny_eps, lat, pos, 3, "normal", 1, "l1", 0.6))[1]
    assert get_method("npi").params(npi) == NPIParams(1, "l1", 0.6)
    assert list(npi.settings) == ["steps", "scheduler", "fixed_point_iterations", "proximal", "quantile"]
    rf = node_out(RFInversion.execute(tiny_flow, lat, pos, 3, "simple", 0.5, 7, 0.9, 0.0, 1.0))[1]
    assert get_method("rf").params(rf) == RFParams(0.5, 7, 0.9, 0.0, 1.0)
    # missing keys take the defaults; stored values are coerced to the field's type; '' / None mean "off"
    assert NPIParams.from_settings({"quantile": "0.5", "proximal": ""}) == NPIParams(0, None, 0.5)
    assert get_method("edict").params(npi.with_changes(settings={})).mix == 0.93
    ddpm = node_out(DDPMInversion.execute(tiny_eps, lat, pos, 3.5, 4, "normal", 2, 5, negative=encode("")))[1]
    assert ddpm.start_index == 2 and get_method("ddpm").params(ddpm).seed == 5


# ---------------------------------------------------------------------------------------------
# A new method: subclass + @register, nothing else
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def source_prompt_method():
    @register
    class SourcePromptEverywhere(InversionMethod):
        """A method whose target branch is guided like its source: the edit must equal the reconstruction."""
        name = "test_source_prompt"
        label = "test"
        replay_step = staticmethod(euler_replay_step)

        def invert(self, run, p):
            return get_method("ddim").invert(run, get_method("ddim").Params())

        def branch_specs(self, ctx, step):
            src = super().branch_specs(ctx, step)[0]
            return [src, src]
    yield get_method("test_source_prompt")
    _REGISTRY.pop("test_source_prompt")


def test_a_registered_method_runs_through_the_driver(tiny_eps, encode, source_prompt_method):
    from editkit.samplers.inversion import invert
    from editkit.samplers.replay import reconstruct
    from editkit.core import denoiser as D
    pos = encode(SOURCE)
    inv = invert(tiny_eps, latent(2), pos, None, 1.0, D.schedule(tiny_eps, "normal", 3), "test_source_prompt")
    assert inv.method == "test_source_prompt" and inv.stats["nfe"] == 3 and inv.label() == "test"
    out, guider = _edit(tiny_eps, inv, encode(TARGET), cfg=5.0, negative=encode(""))
    assert torch.equal(out[1:], out[:1])                       # the target prompt was never used
    assert guider.evaluations == 3                             # one batched call per step
    assert sampler_space_error(tiny_eps, out[:1], reconstruct(tiny_eps, inv)) < 1e-4     # batched vs single rounding


# ---------------------------------------------------------------------------------------------
# Replay hooks
# ---------------------------------------------------------------------------------------------

class SnapTarget(ReplayHook):
    """on_step: the target back onto the stored trajectory (what masked decoding does outside its mask)."""

    def __init__(self, seen):
        self.seen = seen

    def on_step(self, ctx, step, state):
        self.seen.append((step.index, step.position, step.total))
        return state.replace(target=ctx.latent(step.index + 1))


class TargetSeesSource(ReplayHook):
    """on_denoised: the target steps with the source's x0 prediction."""

    def __init__(self, seen):
        self.seen = seen

    def on_denoised(self, ctx, step, source, target):
        self.seen.append(step.index)
        return source, (source.clone() if target is not None else None)


class RedoSteps(ReplayHook):
    """plan + on_jump: every step after the first runs twice; on_jump restores the state of the level
    the repeated step starts from (as RePaint re-noises back to it)."""

    def plan(self, ctx, steps):
        return steps[:1] + [i for i in steps[1:] for _ in (0, 1)]

    def on_step(self, ctx, step, state):
        ctx.scratch[(self, step.index + 1)] = state
        return state

    def on_jump(self, ctx, state, level, to_level):
        assert level == to_level + 1
        return ctx.scratch[(self, to_level)]


def test_on_step_hook_controls_the_latent(tiny_eps, encode):
    inv = _ddim(tiny_eps, encode)
    seen = []
    out, _ = _edit(tiny_eps, inv, encode(TARGET), hooks=(SnapTarget(seen),))
    torch.testing.assert_close(tiny_eps.model.process_latent_in(out[1:]), inv.source.float())
    assert seen == [(i, i, 4) for i in range(4)]
    plain, _ = _edit(tiny_eps, inv, encode(TARGET))
    assert sampler_space_error(tiny_eps, plain[1:], out[1:]) > 1e-3     # without the hook the target moved


@pytest.mark.parametrize("node", ["ddim", "edict"])
def test_on_denoised_hook_sees_every_evaluation(tiny_eps, encode, node):
    pos, seen = encode(SOURCE), []
    if node == "ddim":
        inv = _ddim(tiny_eps, encode)
    else:
        inv = node_out(EDICT.execute(tiny_eps, {"samples": latent(2)}, pos, 1.0, 0.93, 4, "normal"))[1]
    out, guider = _edit(tiny_eps, inv, encode(TARGET), hooks=(TargetSeesSource(seen),))
    if node == "ddim":
        assert seen == [0, 1, 2, 3]
        assert torch.equal(out[1:], out[:1])    # same start, same x0 at every step: the same latent
    else:
        assert seen == [0, 0, 1, 1, 2, 2, 3, 3]  # EDICT evaluates twice per step
        # the target follows the source's predictions; the source alone is snapped onto the stored
        # trajectory (rounding-level corrections), so the two agree to the drift
        assert sampler_space_error(tiny_eps, out[1:], out[:1]) < 1e-3 and guider.source_drift < 1e-3


def test_plan_and_on_jump_revisit_steps(tiny_eps, encode):
    inv = _ddim(tiny_eps, encode)
    plain, g1 = _edit(tiny_eps, inv, encode(TARGET), cfg=3.0, negative=encode(""))
    calls = []
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    noise, guider, _, sigmas, lat = node_out(InversionSampler.execute(tiny_eps, inv, encode(TARGET), 3.0, "source + target",
                                                                     negative=encode("")))
    sampler = InversionReplaySampler(inv, "source + target", (RedoSteps(),))
    out = guider.sample(noise.generate_noise(lat), lat["samples"], sampler, sigmas, seed=0,
                        callback=lambda step, x0, x, total: calls.append((step, total)))
    torch.testing.assert_close(out, plain, atol=0, rtol=0)      # a deterministic step redone from its start state
    assert guider.evaluations == 2 * 4 - 1 == 7 and g1.evaluations == 4
    assert calls == [(i, 7) for i in range(7)]


# ---------------------------------------------------------------------------------------------
# The branch contract
# ---------------------------------------------------------------------------------------------

def test_branch_helpers():
    to = {"cond_or_uncond": [0, 1], B.BRANCHES_KEY: ("source", "target")}
    chunks = B.chunks_of(to, 4)
    assert [(c.start, c.size, c.cond, c.source) for c in chunks] == [(0, 2, True, (0,)), (2, 2, False, (2,))]
    assert B.pairs_of(to, 4) == [(1, 0, 0), (3, 2, 0)]
    assert B.branches_of(to) == ("source", "target") and B.branches_of({}) is None
    # a generated pair (no branch names): row 0 of each chunk is the source
    assert B.pairs_of({"cond_or_uncond": [0]}, 3) == [(1, 0, 0), (2, 0, 1)]
    mo = {"transformer_options": {"x": 1}}
    mo2 = B.with_current(B.with_branches(mo), "target")
    assert mo == {"transformer_options": {"x": 1}}              # copies, never the caller's dict
    assert B.current_branch({"model_options": mo2}) == "target" and B.current_branch({"model_options": mo}) is None
    assert B.branches_of(mo2["transformer_options"]) == B.DEFAULT_BRANCHES


def test_the_guider_names_the_branch_for_cfg_consumers(tiny_eps, encode):
    seen = []

    def post(args):
        seen.append((B.current_branch(args), args["denoised"].shape[0]))
        return args["denoised"]
    m = tiny_eps.clone()
    m.set_model_sampler_post_cfg_function(post)
    inv = _ddim(m, encode, steps=3)
    assert seen == [(None, 1)] * 3                              # inversion: one branch, nothing declared
    seen.clear()
    from editkit.samplers.replay import reconstruct
    reconstruct(m, inv)
    assert seen == [(None, 1)] * 3
    seen.clear()
    _edit(m, inv, encode(TARGET), cfg=3.0, negative=encode(""))
    assert seen == [("source", 1), ("target", 1)] * 3


def test_the_branch_key_is_spelled_once():
    """Every reader imports core.branches: the key's literal appears nowhere else in the pack."""
    literal, hits = '"' + B.BRANCHES_KEY + '"', []
    for root, dirs, files in os.walk(PACK):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "node_modules")]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path, encoding="utf-8") as fh:
                    if literal in fh.read():
                        hits.append(os.path.relpath(path, PACK))
    assert hits == [os.path.join("core", "branches.py")]
