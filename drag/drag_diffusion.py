"""DragDiffusion (Shi et al., CVPR 2024): optimise one inverted latent so that decoder features move.

1. DDIM-invert the image (samplers/inversion.invert, the registry's "ddim", CFG 1) to step `inversion_steps`
   of `steps` (paper: 35 of 50): z_t.
2. Motion supervision, `iterations` times (paper 80; Adam, lr 0.01): the features F of the decoder block
   `decoder_point(model, feature_level)` (paper: the third decoder block, -2; core/features.FeatureCapture
   with grad) upsampled to half the image resolution; for each handle h and its unit direction d to the
   target, loss |F(q + d) - sg(F(q))|_1 over the (2 r1 + 1)^2 patch q around h, plus
   lam * |(z - z_t) outside the editable region|_1. Gradients through core/gradients.run_with_gradients.
3. Point tracking after each step: each handle moves to the position in its (2 r2 + 1)^2 neighbourhood whose
   feature is nearest (L1) to the handle's original feature. Stops when every handle is within 1 feature px
   (2 image px) of its target.
4. Denoise z_t (DDIM) with reference-latent control: decoder self-attention also attends to the source's
   keys/values (attention/reference.ReferenceAttention with the source latent, from MasaCtrl's layer L).
The identity LoRA of the paper is not trained here: connect a model with a LoRA applied instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core import denoiser
from ..core.features import FeatureCapture, decoder_point
from ..core.gradients import autograd, leaf, run_with_gradients
from ..core.introspect import architecture
from ..samplers.steps import euler_step
from .points import DragPoints


@dataclass
class DragDiffusionInfo:
    iterations: int = 0
    losses: list = field(default_factory=list)
    handles: list = field(default_factory=list)        # final handle positions, image px
    reached: bool = False
    point: str = ""

    def describe(self) -> str:
        last = f", last loss {self.losses[-1]:.4f}" if self.losses else ""
        hs = "; ".join(f"({x:.0f}, {y:.0f})" for x, y in self.handles)
        return (f"DragDiffusion: {self.iterations} motion-supervision step(s) on {self.point}{last}; handles now at {hs}"
                + (" (targets reached)" if self.reached else ""))


def _sample(feat: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear features (N, C) of feat (1, C, H, W) at pts (N, 2) in feature-pixel (x, y) coordinates."""
    h, w = feat.shape[-2:]
    g = torch.stack([(pts[:, 0] + 0.5) / w * 2 - 1, (pts[:, 1] + 0.5) / h * 2 - 1], -1)
    return F.grid_sample(feat, g[None, None].to(feat.dtype), mode="bilinear", align_corners=False)[0, :, 0].t()


def _offsets(r: int) -> torch.Tensor:
    a = torch.arange(-r, r + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(a, a, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


def drag_diffusion(model, positive, negative, samples: torch.Tensor, drag: DragPoints, steps: int = 50,
                   inversion_steps: int = 35, iterations: int = 80, lr: float = 0.01, r1: int = 1, r2: int = 3,
                   lam: float = 0.1, cfg: float = 1.0, feature_level: int = -2, reference: bool = True, seed: int = 0,
                   progress=None) -> tuple[torch.Tensor, DragDiffusionInfo]:
    """The dragged latent (user space) and what was done; `drag` fits the latent (drag.fit(w * 8, h * 8))."""
    import comfy.patcher_extension as pe
    from ..attention.controller import default_start_layer, install, layers_of
    from ..attention.reference import ReferenceAttention, ReferencePass
    from ..core.patches import add_wrapper
    from ..samplers.branch_guider import BranchSpec, make_guider
    from ..samplers.inversion import invert

    ms = model.get_model_object("model_sampling")
    full = denoiser.schedule(model, "normal", steps)
    sigmas = full[steps - inversion_steps:].clone()
    inv = invert(model, samples, positive, None, 1.0, sigmas, "ddim")
    z_t = inv.latents[0].float().clone()
    b, c, h, w = z_t.shape
    point = decoder_point(model, feature_level)
    info = DragDiffusionInfo(point=f"{point.key}")
    fh, fw = drag.height // 2, drag.width // 2
    scale = torch.tensor([fw / drag.width, fh / drag.height])
    handles0 = torch.tensor([p[0] for p in drag.pairs], dtype=torch.float32) * scale
    targets = torch.tensor([p[1] for p in drag.pairs], dtype=torch.float32) * scale
    region = drag.region()
    keep = None
    if region is not None:
        keep = 1.0 - F.interpolate(region[None, None], size=(h, w), mode="area")[0, 0]
    o1, o2 = _offsets(r1), _offsets(r2)
    copy_saved = architecture(model) != "unet"     # DiT blocks update tensors in place (core.gradients.autograd)

    clone = model.clone()
    cap = FeatureCapture([point], grad=True)
    cap.install(clone)

    def features(env, z):
        cap.clear()
        env.denoise(z, sigmas[0], "positive")
        f = cap.last(point).features[:1].float()
        return F.interpolate(f, size=(fh, fw), mode="bilinear", align_corners=False)

    def program(env):
        z0 = leaf(z_t.to(env.device), False)
        z = leaf(z0)
        kp = leaf(keep.to(env.device), False) if keep is not None else None
        opt = torch.optim.Adam([z], lr=lr)
        with torch.no_grad():
            f0 = features(env, z0)
        ref = _sample(f0, handles0)                        # (N, C) original handle features
        hs = handles0.clone()
        for it in range(iterations):
            if torch.all((hs - targets).norm(dim=-1) < 1.0):
                info.reached = True
                break
            with autograd(copy_saved=copy_saved):
                feat = features(env, z)
                loss = z.new_zeros(())
                for i in range(len(hs)):
                    d = targets[i] - hs[i]
                    d = d / d.norm().clamp(min=1e-6)
                    q = hs[i][None] + o1
                    loss = loss + (_sample(feat, q + d) - _sample(feat, q).detach()).abs().mean()
                if kp is not None:
                    loss = loss + lam * ((z - z0) * kp).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            cap.clear()
            info.losses.append(float(loss.detach()))
            info.iterations = it + 1
            with torch.no_grad():                          # point tracking on the updated latent
                fn = features(env, z.detach())
                for i in range(len(hs)):
                    cand = hs[i].round()[None] + o2
                    cand[:, 0].clamp_(0, fw - 1)
                    cand[:, 1].clamp_(0, fh - 1)
                    dist = (_sample(fn, cand) - ref[i][None]).abs().sum(-1)
                    hs[i] = cand[int(dist.argmin())]
            if progress is not None:
                progress(1, None)
        cap.clear()
        info.handles = [(float(x) / float(scale[0]), float(y) / float(scale[1])) for x, y in hs]
        return z.detach()

    z_opt = run_with_gradients(clone, {"positive": positive}, program, sigmas, z_t.shape)

    m = model.clone()
    if reference:
        n = layers_of(model)
        tech = ReferenceAttention(1.0, 0.0, 1.0, default_start_layer(n), -1, False, samples, seed)
        add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"reference.pass.{id(tech)}", ReferencePass(tech))
        install(m, tech)
    spec = BranchSpec("positive", "negative" if negative is not None else None, cfg)
    guider = make_guider(m, {"positive": positive, "negative": negative}, cfg)

    def denoise(g, sig, extra_args, _cb, _noise, latent, _dp):
        x = z_opt.to(latent.device)
        for i in range(len(sig) - 1):
            den = g.x0(x, sig[i], spec, extra_args["model_options"])
            x = euler_step(x, den, sig[i], sig[i + 1])
            if progress is not None:
                progress(1, den)
        return x

    out = guider.run(denoise, sigmas, samples.shape, seed=seed)
    return out.to(samples.dtype), info
