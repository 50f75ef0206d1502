"""Guidance nodes: scheduled, stackable guidance terms, the composing GUIDER, CFG++ samplers,
the CFG schedule as a MODEL patch, and a plot of the effective scales."""
from __future__ import annotations

from . import feedback
from .api import io
from .base import EditKitNode

from ..core.errors import EditKitInputError, require
from ..guidance import cfgpp, plot, schedules as S, terms as T
from ..guidance.guider import GuidanceGuider
from ..guidance.model_patch import install_cfg_schedule

Terms = io.Custom("EDITKIT_GUIDANCE_TERMS")
Schedule = io.Custom("EDITKIT_GUIDANCE_SCHEDULE")
CATEGORY = "EditKit/guidance"

LAYERS_TOOLTIP = ("Which attention layers to perturb: 'auto' (the UNet middle block, or the middle DiT block), "
                  "'all', or a comma list such as 'middle', 'input 4', 'output 1.2' (UNet block, optional depth), "
                  "'double 3', 'single 7' (Flux/SD3 blocks) or '#5' (fifth layer in execution order). Checked against "
                  "the model when the guider is built.")


class GuidanceSchedule(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceSchedule",
            display_name="Guidance Schedule",
            category=CATEGORY,
            description="A weight over the sampling run for any guidance term (or for EditKitCFGSchedule): constant, "
                        "linear or cosine ramp, an on/off window, the guidance interval (Kynkäänniemi et al. 2024: "
                        "on only for sigma_low < sigma <= sigma_high; outside it the guider skips the unconditional "
                        "pass) or early-only. Chain schedules through 'previous' to multiply them.",
            inputs=[
                io.Combo.Input("kind", options=S.KINDS, default=S.CONSTANT,
                               tooltip="constant: start_value. linear/cosine: start_value at start_percent ramping to "
                                       "end_value at end_percent. step: start_value inside [start_percent, end_percent], "
                                       "0 outside. interval: start_value for sigma in (sigma_low, sigma_high], 0 outside. "
                                       "early_only: start_value before end_percent, 0 after."),
                io.Float.Input("start_value", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight at the start (or inside the window). 1 = the term's full strength."),
                io.Float.Input("end_value", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight at the end of a linear or cosine ramp."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where a ramp or window starts, as a fraction of the run (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where a ramp or window ends (1 = last step); early_only switches off here."),
                io.Combo.Input("over", options=S.OVER, default=S.PROGRESS,
                               tooltip="Measure ramps and windows by step progress, or by log-sigma position between "
                                       "the run's first and last nonzero sigma."),
                io.Float.Input("sigma_low", default=0.28, min=0.0, max=1000.0, step=0.01,
                               tooltip="interval only: guidance is off at or below this sigma (paper's SD-XL setting: 0.28)."),
                io.Float.Input("sigma_high", default=5.42, min=0.0, max=1000.0, step=0.01,
                               tooltip="interval only: guidance is off above this sigma (paper's SD-XL setting: 5.42)."),
                Schedule.Input("previous", optional=True, tooltip="Optional schedule to multiply with this one."),
            ],
            outputs=[Schedule.Output("schedule", display_name="schedule", tooltip="Connect to a guidance term or EditKitCFGSchedule.")],
        )

    @classmethod
    def execute(cls, kind, start_value, end_value, start_percent, end_percent, over, sigma_low, sigma_high, previous=None) -> io.NodeOutput:
        node = "EditKitGuidanceSchedule"
        require(kind in S.KINDS, node, "kind", f"unknown kind {kind!r}", f"use one of {S.KINDS}")
        require(start_percent <= end_percent, node, "start_percent", "start_percent is after end_percent",
                "make start_percent <= end_percent")
        require(sigma_low < sigma_high, node, "sigma_low", f"sigma_low {sigma_low} is not below sigma_high {sigma_high}",
                "make sigma_low < sigma_high")
        sched = S.Schedule(kind, start_value, end_value, start_percent, end_percent, sigma_low, sigma_high, over)
        return io.NodeOutput(sched.then(previous))


def _term_inputs(extra: list) -> list:
    return extra + [
        Terms.Input("previous", optional=True, tooltip="Terms from an earlier guidance-term node; this node appends to them."),
        Schedule.Input("schedule", optional=True, tooltip="When and how strongly this term acts (default: constant 1)."),
    ]


def _term_outputs() -> list:
    return [Terms.Output("terms", display_name="terms", tooltip="Connect to the next term node or to EditKitGuider 'terms'.")]


def _append(previous, term):
    return io.NodeOutput(T.add_term(previous, term))


def _sched(schedule):
    return schedule if schedule is not None else S.CONSTANT_ONE


class TermCFG(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermCFG", display_name="Guidance Term: CFG schedule", category=CATEGORY,
            description="Classifier-free guidance with a schedule: the effective scale is 1 + (cfg - 1) x weight, with cfg "
                        "from EditKitGuider. Where the weight is 0 (e.g. outside a guidance interval) the unconditional "
                        "pass is skipped. Several CFG terms multiply their weights.",
            inputs=_term_inputs([]), outputs=_term_outputs())

    @classmethod
    def execute(cls, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.CFGTerm(_sched(schedule)))


class TermRescale(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermRescale", display_name="Guidance Term: Rescale CFG", category=CATEGORY,
            description="Rescale CFG (Lin et al. 2024): pull the guided prediction's standard deviation back to the "
                        "conditional prediction's, against over-exposure at high CFG. Same formula as ComfyUI's RescaleCFG, "
                        "but stackable and scheduled.",
            inputs=_term_inputs([io.Float.Input("phi", default=0.7, min=0.0, max=1.0, step=0.01,
                                                tooltip="Rescale strength phi (paper: 0.7). 0 = off.")]),
            outputs=_term_outputs())

    @classmethod
    def execute(cls, phi, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.RescaleTerm(_sched(schedule), phi))


class TermAPG(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermAPG", display_name="Guidance Term: APG", category=CATEGORY,
            description="Adaptive projected guidance (Sadat et al. 2024): the CFG update cond + (cfg - 1) x diff uses a diff "
                        "with negative momentum, a norm threshold and a down-weighted component parallel to the "
                        "conditional prediction, which allows high CFG without over-saturation. The schedule blends "
                        "between plain CFG (0) and APG (1).",
            inputs=_term_inputs([
                io.Float.Input("eta", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight of the parallel component (0 in the paper; 1 = no projection)."),
                io.Float.Input("norm_threshold", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Clip the L2 norm of the guidance difference per image to this value; 0 = off. "
                                       "The norm grows with the latent size."),
                io.Float.Input("momentum", default=-0.5, min=-5.0, max=1.0, step=0.01,
                               tooltip="Running-average factor beta of the difference over steps (paper: negative, "
                                       "e.g. -0.5); 0 = off."),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, eta, norm_threshold, momentum, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.APGTerm(_sched(schedule), eta, norm_threshold, momentum))


class TermDynamicThreshold(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermDynamicThreshold", display_name="Guidance Term: Dynamic Thresholding",
            category=CATEGORY,
            description="Dynamic thresholding (Imagen; latent form as in sd-dynamic-thresholding): per channel, clip the "
                        "guided prediction at a percentile of its absolute values and rescale it to the range the "
                        "prediction would have at the lower mimic scale. Applied last.",
            inputs=_term_inputs([
                io.Float.Input("percentile", default=0.995, min=0.5, max=1.0, step=0.001,
                               tooltip="Quantile of |centred prediction| used as the clipping level (Imagen: 0.995)."),
                io.Float.Input("mimic_scale", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="The CFG scale whose value range the result keeps."),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, percentile, mimic_scale, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.DynamicThresholdTerm(_sched(schedule), percentile, mimic_scale))


class TermPerpNeg(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermPerpNeg", display_name="Guidance Term: Perp-Neg", category=CATEGORY,
            description="Perpendicular negative guidance (Armandpour et al. 2023): guide from the empty prompt toward the "
                        "positive, and away from only the part of the negative prompt that is perpendicular to the "
                        "positive, so a negative cannot cancel what the positive asks for. Adds one branch (the empty "
                        "prompt), batched with cond and uncond.",
            inputs=_term_inputs([
                io.Conditioning.Input("empty_conditioning", tooltip="The empty prompt encoded with the same CLIP."),
                io.Float.Input("neg_scale", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Strength of the perpendicular negative component."),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, empty_conditioning, neg_scale, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.PerpNegTerm(_sched(schedule), empty_conditioning, neg_scale))


class TermSAG(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermSAG", display_name="Guidance Term: SAG", category=CATEGORY,
            description="Self-attention guidance (Hong et al. 2023): blur the prediction where the chosen self-attention "
                        "layers look most, re-noise, predict again and guide away from the blurred result. UNets and "
                        "Flux/SD3 (joint attention of the image tokens). Costs one extra model call per step.",
            inputs=_term_inputs([
                io.Float.Input("scale", default=0.5, min=-10.0, max=10.0, step=0.01, tooltip="SAG scale (paper/ComfyUI: 0.5)."),
                io.Float.Input("blur_sigma", default=2.0, min=0.1, max=10.0, step=0.1, tooltip="Gaussian blur sigma in latent pixels."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, scale, blur_sigma, layers, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.SAGTerm(_sched(schedule), scale, blur_sigma, layers))


class TermPAG(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermPAG", display_name="Guidance Term: PAG", category=CATEGORY,
            description="Perturbed-attention guidance (Ahn et al. 2024): a branch of the conditional prediction whose "
                        "self-attention is the identity at the chosen layers; guide away from it. On Flux/SD3 the "
                        "chosen blocks' attention is perturbed through the attention override. The branch is batched "
                        "with cond and uncond: one extra branch, no extra call.",
            inputs=_term_inputs([
                io.Float.Input("scale", default=3.0, min=-20.0, max=100.0, step=0.01, tooltip="PAG scale (paper: about 3)."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, scale, layers, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.PAGTerm(_sched(schedule), scale, layers))


class TermCADS(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermCADS", display_name="Guidance Term: CADS", category=CATEGORY,
            description="Condition-annealed sampling (Sadat et al. 2024): noise the text embedding early in sampling "
                        "(gamma = 0 for t >= tau2, 1 for t <= tau1, linear between) and rescale it to the original mean "
                        "and std, for more diverse images at high CFG. The schedule multiplies the noise scale.",
            inputs=_term_inputs([
                io.Float.Input("noise_scale", default=0.25, min=0.0, max=5.0, step=0.01, tooltip="Noise scale s (paper: 0.1-0.25)."),
                io.Float.Input("tau1", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Below this diffusion time (1 = pure noise) the condition is clean."),
                io.Float.Input("tau2", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Above this diffusion time the condition is pure (rescaled) noise."),
                io.Float.Input("psi", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Mix of the mean/std-rescaled noisy condition (1) and the raw one (0)."),
                io.Boolean.Input("noise_negative", default=False, tooltip="Also anneal the negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the condition noise (combined with the sampling seed)."),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, noise_scale, tau1, tau2, psi, noise_negative, seed, previous=None, schedule=None) -> io.NodeOutput:
        require(tau1 < tau2, "EditKitGuidanceTermCADS", "tau1", f"tau1 {tau1} is not below tau2 {tau2}", "make tau1 < tau2")
        return _append(previous, T.CADSTerm(_sched(schedule), noise_scale, tau1, tau2, psi, noise_negative, seed))


class TermAutoGuidance(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermAutoGuidance", display_name="Guidance Term: AutoGuidance", category=CATEGORY,
            description="AutoGuidance (Karras et al. 2024): guide away from a weaker version of the model (smaller or "
                        "less trained, same latent space) instead of, or on top of, the unconditional prediction: "
                        "+ scale x (cond - weak cond). One extra call of the weak model per step.",
            inputs=_term_inputs([
                io.Model.Input("weak_model", tooltip="A weaker model of the same family (a separate checkpoint)."),
                io.Float.Input("scale", default=1.0, min=-10.0, max=20.0, step=0.01,
                               tooltip="Guidance weight above the good model (the paper's w - 1)."),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, weak_model, scale, previous=None, schedule=None) -> io.NodeOutput:
        return _append(previous, T.AutoGuidanceTerm(_sched(schedule), weak_model, scale))


def resolve_sites(model, guidance_terms, node: str, input_name: str = "terms") -> dict:
    """Check a term list against the model; returns {term index: what its resolve() gave} (PAG/SAG: layers)."""
    sites = {}
    seen = set()
    for i, t in enumerate(guidance_terms):
        if t.unique and t.kind in seen:
            raise EditKitInputError(node, input_name, f"two {t.title} terms in the list", f"keep one {t.title} term")
        seen.add(t.kind)
        try:
            bound = t.resolve(model)
        except T.TermError as e:
            raise EditKitInputError(node, input_name, e.problem, e.fix) from None
        if bound is not None:
            sites[i] = bound
    return sites


class Guider(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuider", display_name="EditKit Guider (composable guidance)", category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that composes guidance terms, each with its own schedule: CFG "
                        "schedules and guidance intervals, rescale, APG, dynamic thresholding, Perp-Neg, SAG, PAG, CADS "
                        "and AutoGuidance. Branches are batched and skipped when their term is off. With no terms it is "
                        "ComfyUI's CFGGuider, and patches already on the model (RescaleCFG, PAG, ...) keep working.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; its own CFG patches are applied too."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (the unconditional branch)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Base CFG scale; CFG terms schedule it."),
                Terms.Input("terms", optional=True, tooltip="The chain of EditKitGuidanceTerm* nodes. Empty = plain CFG."),
            ],
            outputs=[io.Guider.Output("guider", display_name="guider", tooltip="Connect to SamplerCustomAdvanced 'guider'.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, terms=None) -> io.NodeOutput:
        guidance_terms = tuple(terms or ())
        sites = resolve_sites(model, guidance_terms, "EditKitGuider")
        g = GuidanceGuider(model, guidance_terms, sites)
        g.set_conds(positive, negative)
        g.set_cfg(cfg)
        return io.NodeOutput(g)


class SamplerCFGPP(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitSamplerCFGPP", display_name="Sampler CFG++", category=CATEGORY,
            description="CFG++ (Chung et al. 2024): each step moves to the guided x0 but re-noises with the unconditional "
                        "prediction, which keeps samples on the data manifold; use CFG scales around 0.5-1.5 (not 5-8). "
                        "Euler or DPM++(2M), for EPS, v-prediction and flow models; works with CFGGuider and EditKitGuider "
                        "(steps without an unconditional pass become plain steps).",
            inputs=[io.Combo.Input("solver", options=cfgpp.SOLVERS, default="euler", tooltip="Euler (first order) or DPM++(2M).")],
            outputs=[io.Sampler.Output("sampler", display_name="sampler", tooltip="Connect to SamplerCustomAdvanced 'sampler'.")],
        )

    @classmethod
    def execute(cls, solver) -> io.NodeOutput:
        require(solver in cfgpp.SOLVERS, "EditKitSamplerCFGPP", "solver", f"unknown solver {solver!r}", f"use one of {cfgpp.SOLVERS}")
        return io.NodeOutput(cfgpp.sampler(solver))


class CFGSchedule(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitCFGSchedule", display_name="CFG Schedule (model patch)", category=CATEGORY,
            description="The guidance schedules for KSampler users: the effective CFG becomes 1 + (cfg - 1) x weight at "
                        "each step, and where the weight is 0 (outside a guidance interval, after early-only) the "
                        "unconditional pass is skipped. Uses chaining hooks, so it stacks with other CFG patches.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a clone is patched)."),
                Schedule.Input("schedule", tooltip="From EditKitGuidanceSchedule."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The scheduled model; sample with KSampler as usual.")],
        )

    @classmethod
    def execute(cls, model, schedule) -> io.NodeOutput:
        m = model.clone()
        install_cfg_schedule(m, schedule)
        return io.NodeOutput(m)


class GuidancePlot(EditKitNode):
    EDITKIT_SHOWS = ("image",)
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidancePlot", display_name="Guidance Plot", category=CATEGORY,
            description="Draw the effective scale of each guidance term at every step of a schedule: the CFG scale after "
                        "CFG terms, and scale x schedule weight for every other term.",
            inputs=[
                io.Sigmas.Input("sigmas", tooltip="The run's sigmas (e.g. from BasicScheduler), the same the sampler gets."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="The guider's base CFG."),
                Terms.Input("terms", optional=True, tooltip="The term chain given to EditKitGuider."),
            ],
            outputs=[io.Image.Output("plot", display_name="plot", tooltip="The plot as an image (also shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, sigmas, cfg, terms=None) -> io.NodeOutput:
        require(len(sigmas) >= 2, "EditKitGuidancePlot", "sigmas", "fewer than two sigmas (no step to plot)",
                "connect a schedule with at least one step")
        image = plot.draw(tuple(terms or ()), sigmas, cfg)
        return io.NodeOutput(image, ui=feedback.show(cls, images=image))


class TermSEGA(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitGuidanceTermSEGA", display_name="Guidance Term: SEGA (semantic guidance)", category=CATEGORY,
            description="Semantic guidance (SEGA, Brack et al. 2023): steer the image toward a concept or away from it "
                        "(add / remove), on top of CFG: the concept's noise difference to the unconditional prediction, "
                        "kept only where it is strongest (element-wise percentile), with momentum and a warm-up. "
                        "Chain several SEGA terms for several concepts; each adds one branch to the batched call.",
            inputs=_term_inputs([
                io.Conditioning.Input("concept", tooltip="The concept encoded with the same CLIP (e.g. 'glasses', 'a blue square')."),
                io.Combo.Input("direction", options=["add", "remove"], default="add",
                               tooltip="add: guide toward the concept; remove: away from it."),
                io.Float.Input("scale", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="Edit guidance scale s_e (paper: about 5)."),
                io.Int.Input("warmup", default=10, min=0, max=1000,
                             tooltip="Steps before the concept is applied (momentum already builds up; paper: about 10)."),
                io.Float.Input("threshold", default=0.95, min=0.0, max=1.0, step=0.01,
                               tooltip="Element-wise percentile: only the strongest (1 - threshold) of each channel is guided "
                                       "(paper: 0.9-0.95). 0 = everywhere."),
                io.Float.Input("momentum_scale", default=0.3, min=0.0, max=10.0, step=0.01, tooltip="Momentum scale s_m."),
                io.Float.Input("momentum_beta", default=0.6, min=0.0, max=0.999, step=0.01, tooltip="Momentum decay beta_m."),
            ]), outputs=_term_outputs())

    @classmethod
    def execute(cls, concept, direction, scale, warmup, threshold, momentum_scale, momentum_beta, previous=None,
                schedule=None) -> io.NodeOutput:
        node = "EditKitGuidanceTermSEGA"
        if not isinstance(concept, list) or not concept or not isinstance(concept[0], (list, tuple)):
            raise EditKitInputError(node, "concept", "not a CONDITIONING", "connect a CLIP Text Encode of the concept")
        require(direction in ("add", "remove"), node, "direction", f"unknown direction {direction!r}", "use add or remove")
        require(0.0 <= threshold <= 1.0, node, "threshold", f"{threshold} is outside [0, 1]", "use 0.9-0.95 (the paper)")
        return _append(previous, T.SEGATerm(_sched(schedule), concept, direction == "remove", float(scale), int(warmup),
                                            float(threshold), float(momentum_scale), float(momentum_beta)))


NODES = [GuidanceSchedule, TermCFG, TermRescale, TermAPG, TermDynamicThreshold, TermPerpNeg, TermSAG, TermPAG,
         TermCADS, TermAutoGuidance, TermSEGA, Guider, SamplerCFGPP, CFGSchedule, GuidancePlot]
