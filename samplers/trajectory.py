"""The EDITKIT_INVERSION object: one trajectory format shared by every inversion method.

Every inversion node of EditKit returns an `EditKitInversion`; `EditKitInversionSampler` (and the
attention-control nodes that read its source branch) consume it. The object is immutable by
convention: consumers never modify it (ComfyUI caches node outputs and may hand the same object to
several nodes); methods that derive a variant (`with_changes`) return a new object.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core import introspect
from ..core.errors import EditKitInputError


@dataclass(frozen=True)
class ModelIdentity:
    """What a trajectory is valid for: the model family, its parameterization and its latent layout."""
    family: str                 # core.introspect family string (sd1, sdxl, flux, unet, ...)
    architecture: str           # unet | mmdit | flux | other
    parameterization: str       # eps | v_prediction | flow | ...
    latent_channels: int
    latent_format: str          # class name of the model's latent format (scale / shift of latents)
    model_id: int = field(default=0, compare=False)   # id() of the underlying BaseModel (warn-only check)

    def describe(self) -> str:
        fam = introspect.FAMILY_LABELS.get(self.family, self.family)
        return f"{fam} {self.architecture} ({self.parameterization}, {self.latent_channels}-channel latents)"


def model_identity(model) -> ModelIdentity:
    base = model.model
    fmt = base.latent_format
    return ModelIdentity(introspect.model_family(model), introspect.architecture(model), introspect.parameterization(model),
                         int(fmt.latent_channels), type(fmt).__name__, id(base))


@dataclass(frozen=True)
class EditKitInversion:
    """A real image inverted by one of EditKit's methods (socket type EDITKIT_INVERSION).

    Fields (tensors live on ComfyUI's intermediate device, CPU by default; latents are in the model's
    *sampler space*, i.e. after `latent_format.process_in`, at the noise level of the same index):

    method       name of the inversion method in the registry (samplers/methods/: "ddim", "npi", "nti",
                 "edict", "ddpm", "rf", ...): how the trajectory was made and how EditKitInversionSampler
                 replays it.
    sigmas       (N+1,) float32, the descending sampling schedule (k-diffusion sigmas) the trajectory
                 lives on; sigmas[-1] == 0. Editing runs sigmas[start_index:].
    latents      list of N+1 tensors (B, C, H, W): latents[i] is the source at sigmas[i];
                 latents[-1] is the source image latent, latents[0] the inverted noise. For DDIM/NPI/NTI
                 this is the inversion (pivot) trajectory; for DDPM the independently noised latents;
                 for EDICT the x sequence (its partner sequence is `pair`).
    positive     the source CONDITIONING the trajectory was made with.
    negative     the source negative CONDITIONING (None when cfg == 1 and none was given).
    cfg          guidance scale of the source branch (inversion cfg; NTI: the cfg it was optimised for).
    identity     ModelIdentity of the model that made it; using it with another family, parameterization
                 or latent layout raises EditKitInputError.
    settings     dict of the method's settings: display entries (steps, scheduler) and the fields of the
                 method's typed Params (fixed_point_iterations, mix, gamma, eta, start, stop, proximal,
                 quantile, ...), which the replay reads back (`get_method(method).params(inv)`).
    start_index  first step of editing (DDPM's T_skip); 0 otherwise.
    direct       Direct Inversion (PnP Inversion): during editing the source branch is snapped onto
                 latents[i + 1] after every step (it then reproduces the source exactly).
    null_embeddings  NTI: list of N tensors (B, T, D), the optimised unconditional cross-attention
                 context for each step.
    pair         EDICT: list of N+1 tensors, the coupled y sequence (same indexing as latents).
    residuals    DDPM: list of N tensors, what each replayed step adds after the posterior mean
                 (noise_std[i] * z_i; the last step's is its raw correction since its std is 0).
    noise_std    DDPM: list of N floats, the posterior std of each step (0 for the last step).
    noise        RF: the noise target y1 of the controlled forward ODE.
    stats        numbers about the run: nfe (model evaluations), iterations (NTI per step), ...

    Source branch + target branch layout (contract with the attention-control nodes): the sampler
    evaluates both branches in one batch: every cond_or_uncond chunk of size 2B holds the source batch
    first, then the target batch, declared as ("source", "target") (the branch contract, core/branches.py).
    The source branch uses `positive` / `negative` / `cfg` above (NPI: no guidance; NTI: the step's null
    embedding as its unconditional context); when it is unguided its rows of an unconditional chunk carry
    its own prompt as a placeholder (that output is not used). The target branch uses the sampler's prompt,
    negative (default: the source negative; NPI: the source prompt; NTI: the null embeddings) and cfg.
    """
    method: str
    sigmas: torch.Tensor
    latents: list
    positive: Any
    negative: Any
    cfg: float
    identity: ModelIdentity
    settings: dict = field(default_factory=dict)
    start_index: int = 0
    direct: bool = False
    null_embeddings: Optional[list] = None
    pair: Optional[list] = None
    residuals: Optional[list] = None
    noise_std: Optional[list] = None
    noise: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)

    # --- derived -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def batch_shape(self) -> tuple:
        return tuple(self.latents[-1].shape)

    @property
    def source(self) -> torch.Tensor:
        """The source image latent (sampler space)."""
        return self.latents[-1]

    @property
    def start_latent(self) -> torch.Tensor:
        return self.latents[self.start_index]

    @property
    def nbytes(self) -> int:
        """Memory held by the stored trajectory (all tensors)."""
        total = 0
        for group in (self.latents, self.pair, self.residuals, self.null_embeddings):
            for t in group or []:
                total += t.numel() * t.element_size()
        if self.noise is not None:
            total += self.noise.numel() * self.noise.element_size()
        return total

    def with_changes(self, **changes) -> "EditKitInversion":
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        from .methods import get_method     # the registry builds on this module
        return get_method(self.method).label + (" + Direct Inversion" if self.direct else "")

    # --- validation ----------------------------------------------------------------------------
    def check_model(self, model, node: str, input_name: str = "model") -> None:
        """Raise a clear error when `model` is not the kind of model the trajectory was made with."""
        ident = model_identity(model)
        mine = self.identity
        if (ident.family, ident.architecture, ident.parameterization, ident.latent_channels, ident.latent_format) != \
                (mine.family, mine.architecture, mine.parameterization, mine.latent_channels, mine.latent_format):
            raise EditKitInputError(
                node, input_name,
                f"the inversion was made with a {mine.describe()} model but this is a {ident.describe()} model",
                "connect the same model that the inversion node used (a trajectory is only valid for its own model)")
        if ident.model_id != mine.model_id:
            logging.warning("%s: the model is not the one the inversion was made with (same kind: %s); "
                            "reconstruction is only exact with the same weights.", node, ident.describe())

    def check_latent(self, shape, node: str, input_name: str) -> None:
        shape = tuple(shape)
        if shape != self.batch_shape:
            raise EditKitInputError(node, input_name,
                                    f"latent shape {shape} differs from the inverted latent's {self.batch_shape}",
                                    "use the latent (or size) of the image that was inverted")


def to_storage(t: torch.Tensor) -> torch.Tensor:
    """Keep a tensor on ComfyUI's intermediate device (float64 states stay float64: exact replays need them)."""
    import comfy.model_management
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return t.detach().to(comfy.model_management.intermediate_device(), dtype=dtype).clone()


def work_dtype(device) -> torch.dtype:
    """Latent arithmetic of inversion/replay loops: float64 where the device has it (EDICT and DDPM
    reconstructions are exact only up to the rounding of their states), float32 elsewhere (MPS)."""
    return torch.float64 if torch.device(device).type in ("cpu", "cuda") else torch.float32
