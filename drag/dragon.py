"""DragonDiffusion (Mou et al., ICLR 2024) and DiffEditor (Mou et al., CVPR 2024): drag editing by energy
guidance from feature correspondence. No weights and no latent are optimised.

1. DDIM-invert the image (samplers/inversion.invert, the registry's "ddim", CFG 1) over `steps`: the memory
   bank is that trajectory (the source latent z_t^src at every step). Start from z_T with the 3x3 latent patch
   at each handle copied to its target (as the authors' code does).
2. Each step runs the source z_t^src and the edit z_t in ONE batched call (the branch contract, "source",
   "target"). Visual cross-attention: decoder self-attention of the edit also attends to the source's keys
   and values at the same step (attention/reference.ReferenceAttention in batch mode, from MasaCtrl's layer L;
   the memory bank's K/V are recomputed in that call rather than stored). The same call records the source's
   decoder features (core/features.FeatureCapture) at two decoder levels (the paper: layers 2 (semantic) and
   3 (low-level) = `decoder_point(-3)`, `decoder_point(-2)`), upsampled to half the image resolution.
3. Guided steps (the first `guide_until` of the schedule; paper 30 of 50): a second forward of the edit latent
   alone, with gradients (core/gradients.run_with_gradients), gives its features F. Energies, with the
   similarity s = (cos + 1) / 2 in [0, 1] and the paper's 1 / (1 + 4 s) form:
     edit     w_edit / (1 + 4 S) where S = (local + global) / 2: local = mean s between F at the target patch
              and the source's F at the handle patch (3x3 feature px), global = s of their means; plus
              w_inpaint * s(F at the handle's place, source there) (the handle's old place should change);
     content  w_content / (1 + 4 s) over the features outside the editable region (F vs the source's F).
   The gradient of the energy w.r.t. the model's input latent (the VP latent of SD, as the paper's) is added
   to the predicted noise: eps_g = eps + energy_scale * 40 * dE/dz (the authors' 1e3 * 4e-2 units); the step
   forms x0 from eps_g and keeps the unguided eps as its direction (the authors' DDIM update).
DiffEditor adds (`diffeditor=True`):
   * regional gradient guidance: the edit energy's gradient is applied inside the editable region only, the
     content energy's outside it;
   * regional SDE: in the middle third of the guided steps (paper: steps 10-20 of 50) the step is a DDIM step
     with eta = `sde_strength` inside the editable region (fresh noise there) and eta = 0 outside;
   * time travel: in the last third of the guided steps, every other step is rolled back (the new latent
     DDIM-inverted one step up) and guided again, `time_travel` extra times (paper 3 in all, i.e. 2 extra);
     after the first third, guidance runs every other step (the paper's schedule).
   Its trained image-prompt encoder (a QFormer over CLIP image tokens) is not available: EditKit's IP-Adapter
   applied to the model stands in where the user has IP-Adapter files.
Every model space (EPS, v-prediction, flow) through core/denoiser.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core import denoiser
from .points import DragPoints

ENERGY_UNIT = 1e3 * 4e-2       # the authors' code: the UI's energy scale x 1e3, gradients x 4e-2
FEATURE_LEVELS = (-3, -2)      # decoder levels 2 and 3 of SD1.x (counted from the finest)
PATCH = 1                      # the handle / target patch: (2 * PATCH + 1)^2 feature pixels


@dataclass
class DragonInfo:
    method: str = "DragonDiffusion"
    steps: int = 0
    guided: int = 0                  # guided model evaluations (each one forward + backward)
    rollbacks: int = 0
    sde_steps: int = 0
    evaluations: int = 0             # batched (source + edit) model calls
    energies: list = field(default_factory=list)   # (edit, content) per guided evaluation
    points: str = ""

    def describe(self) -> str:
        e = ""
        if self.energies:
            (e0, c0), (e1, c1) = self.energies[0], self.energies[-1]
            e = f"; edit energy {e0:.3f} -> {e1:.3f}, content energy {c0:.3f} -> {c1:.3f}"
        extra = f", {self.rollbacks} time-travel roll-back(s), {self.sde_steps} regional SDE step(s)" \
            if self.method == "DiffEditor" else ""
        return (f"{self.method}: {self.steps} steps, {self.guided} guided evaluation(s) on {self.points}{extra}{e}")


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between feature vectors along dim 1 (in [0, 1])."""
    return (F.cosine_similarity(a, b, dim=1) + 1.0) / 2.0


def _patch(h: int, w: int, x: float, y: float, r: int = PATCH) -> torch.Tensor:
    """(h, w) bool: the (2r+1)^2 feature pixels around (x, y) (feature px), kept inside the map."""
    m = torch.zeros(h, w, dtype=torch.bool)
    cx, cy = min(max(int(x), r), w - 1 - r), min(max(int(y), r), h - 1 - r)
    m[cy - r:cy + r + 1, cx - r:cx + r + 1] = True
    return m


@dataclass(frozen=True)
class DragMasks:
    """Masks of one drag on the feature grid (fh, fw), and the editable region on the latent grid."""
    handles: tuple          # per pair (fh, fw) bool
    targets: tuple
    outside: torch.Tensor   # (fh, fw) bool: where the content energy holds
    region: torch.Tensor    # (h, w) float on the latent grid: the editable region (1 = may change)


def drag_masks(drag: DragPoints, fh: int, fw: int, h: int, w: int) -> DragMasks:
    sx, sy = fw / drag.width, fh / drag.height
    hs = tuple(_patch(fh, fw, hx * sx, hy * sy) for (hx, hy), _ in drag.pairs)
    ts = tuple(_patch(fh, fw, tx * sx, ty * sy) for _, (tx, ty) in drag.pairs)
    reg = drag.region()
    if reg is None:       # no painted region: the handle and target patches (dilated) may change
        union = torch.zeros(fh, fw, dtype=torch.bool)
        for m in hs + ts:
            union |= m
        union = F.max_pool2d(union[None, None].float(), 5, 1, 2)[0, 0]
        region = F.interpolate(union[None, None], size=(h, w), mode="area")[0, 0]
        outside = union < 0.5
    else:
        outside = F.interpolate(reg[None, None], size=(fh, fw), mode="area")[0, 0] < 0.5
        region = F.interpolate(reg[None, None], size=(h, w), mode="area")[0, 0]
    return DragMasks(hs, ts, outside, (region > 0).float())


def energies(cur: list, ref: list, masks: DragMasks, w_edit: float, w_content: float, w_inpaint: float):
    """(edit, content) energies of the edit's features `cur` against the source's `ref` (lists over feature
    levels of (1, C, fh, fw) maps on the same grid). Lower is better; both are differentiable in cur."""
    e_edit = cur[0].new_zeros(())
    e_con = cur[0].new_zeros(())
    n = len(cur) * len(masks.handles)
    for fc, fr in zip(cur, ref):
        c, r = fc[0].flatten(1), fr[0].flatten(1)           # (C, fh * fw)
        for hm, tm in zip(masks.handles, masks.targets):
            hi, ti = hm.flatten().to(c.device), tm.flatten().to(c.device)
            a, b = c[:, ti].t(), r[:, hi].t()                # target patch of the edit, handle patch of the source
            local = similarity(a, b).mean()
            glob = similarity(a.mean(0, keepdim=True), b.mean(0, keepdim=True)).mean()
            e_edit = e_edit + w_edit / (1.0 + 4.0 * (local + glob) / 2.0) / n
            old = (hm & ~tm).flatten().to(c.device)
            if w_inpaint and bool(old.any()):
                e_edit = e_edit + w_inpaint * similarity(c[:, old].t(), r[:, old].t()).mean() / n
        out = masks.outside.flatten().to(c.device)
        if w_content and bool(out.any()):
            e_con = e_con + w_content / (1.0 + 4.0 * similarity(c[:, out].t(), r[:, out].t()).mean()) / len(cur)
    return e_edit, e_con


def copy_handle_patches(x: torch.Tensor, drag: DragPoints) -> torch.Tensor:
    """x with the 3x3 latent patch around each handle copied to its target (the authors' z_T preparation)."""
    out = x.clone()
    h, w = x.shape[-2:]
    for (hx, hy), (tx, ty) in drag.pairs:
        def corner(px, py):
            return (min(max(int(py * h / drag.height) - 1, 0), h - 3), min(max(int(px * w / drag.width) - 1, 0), w - 3))
        (ay, ax), (by, bx) = corner(hx, hy), corner(tx, ty)
        out[..., by:by + 3, bx:bx + 3] = x[..., ay:ay + 3, ax:ax + 3]
    return out


def ddim_eta_step(ms, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, s: float, s_next: float,
                  eta, noise: torch.Tensor) -> torch.Tensor:
    """DDIM with stochasticity eta (a tensor broadcasting over x: regional), any model space: the posterior
    std at eta, the rest of the noise level along eps (eta = 0: the deterministic step; 1: DDPM)."""
    from ..samplers.steps import ve_sigma
    if s_next <= 0:
        return x0
    v, vn = ve_sigma(ms, s), ve_sigma(ms, s_next)
    ratio = 0.0 if v == float("inf") else vn / v
    frac = torch.as_tensor(eta, dtype=x.dtype, device=x.device) * (1.0 - ratio * ratio) ** 0.5   # std / vn (VE units)
    direction = (1.0 - frac * frac).clamp(min=0.0) ** 0.5
    return denoiser.add_noise(ms, x0, direction * eps + frac * noise, s_next)


def feature_points(model, levels=FEATURE_LEVELS) -> list:
    """The decoder blocks whose features the energy reads: `levels` that exist in the model's layout (a UNet
    with fewer decoder levels than SD1.x keeps the ones it has). ValueError when none exists."""
    from ..core.features import decoder_point
    out, err = [], None
    for k in dict.fromkeys(levels):
        try:
            p = decoder_point(model, k)
        except ValueError as e:
            err = e
            continue
        if p.key not in [q.key for q in out]:
            out.append(p)
    if not out:
        raise err or ValueError("EditKit: no decoder features")
    return out


def dragon_drag(model, positive, negative, samples: torch.Tensor, drag: DragPoints, steps: int = 50,
                inversion_steps: int | None = None, cfg: float = 4.0,
                energy_scale: float = 2.0, w_edit: float = 4.0, w_content: float = 6.0, w_inpaint: float = 0.2,
                guide_until: float = 0.6, reference: bool = True, diffeditor: bool = False, sde_strength: float = 0.4,
                time_travel: int = 2, seed: int = 42, feature_levels=FEATURE_LEVELS,
                progress=None) -> tuple[torch.Tensor, DragonInfo]:
    """The dragged latent (user space, first batch row) and what was done; `drag` fits the latent."""
    from ..attention.controller import default_start_layer, install, layers_of
    from ..attention.reference import ReferenceAttention
    from ..core.branches import chunks_of
    from ..core.features import FeatureCapture
    from ..core.gradients import autograd, leaf, run_with_gradients
    from ..core.introspect import architecture
    from ..samplers.branch_guider import BranchSpec
    from ..samplers.inversion import invert

    samples = samples[:1]
    ms = model.get_model_object("model_sampling")
    n_run = steps if inversion_steps is None else max(1, min(int(inversion_steps), steps))
    skip = steps - n_run                                      # steps of the schedule above the inverted level
    sigmas = denoiser.schedule(model, "normal", steps)[skip:].clone()
    inv = invert(model, samples, positive, None, 1.0, sigmas, "ddim")
    bank = [t.float() for t in inv.latents]                  # bank[i]: the source at sigmas[i]
    b, c, h, w = bank[0].shape
    points = feature_points(model, feature_levels)
    fh, fw = 2 * h, 2 * w            # the authors' up_scale 2: a quarter of the image size (4 image px per feature px)
    info = DragonInfo("DiffEditor" if diffeditor else "DragonDiffusion", n_run,
                      points=", ".join(f"{p.block} {p.index}" for p in points))
    n_guided = max(0, min(steps, int(round(steps * guide_until))))
    third = max(n_guided // 3, 1)

    def guided_at(i: int) -> bool:
        if energy_scale <= 0 or i >= n_guided:
            return False
        return not diffeditor or i < third or i % 2 == 0

    def rollbacks_at(i: int) -> int:
        return time_travel if diffeditor and 2 * third <= i < n_guided and i % 2 == 0 and guided_at(i) else 0

    def sde_at(i: int) -> bool:
        return diffeditor and sde_strength > 0 and third <= i < 2 * third

    clone = model.clone()           # the user's model never gets these patches
    copy_saved = architecture(model) != "unet"     # DiT blocks update tensors in place (core.gradients.autograd)
    if reference:
        install(clone, ReferenceAttention(1.0, 0.0, 1.0, default_start_layer(layers_of(model)), -1, False))
    cap = FeatureCapture(points, rows=lambda to, n: [r for ch in chunks_of(to, n) if ch.cond for r in ch.source],
                         grad=True)
    cap.install(clone)

    def feats(like_grid=(fh, fw)):
        out = []
        for p in points:
            recs = [r for r in cap.captured(p) if r.features.shape[0]]
            f = recs[-1].features[:1].float()
            out.append(F.interpolate(f, size=like_grid, mode="bilinear", align_corners=False))
        return out

    use_neg = negative is not None and cfg != 1.0
    src_spec = BranchSpec("positive", None, 1.0)
    edit_spec = BranchSpec("positive", "negative" if use_neg else None, cfg)
    gen = torch.Generator().manual_seed(int(seed))

    def program(env):
        g, mo = env.guider, env.model_options
        dev = env.device
        masks = drag_masks(drag, fh, fw, h, w)       # made here, outside inference mode: autograd may save them
        region = masks.region.to(dev)
        x = copy_handle_patches(bank[0], drag).to(dev)

        def model_eps(xt, i):
            """One batched call (source bank latent + edit): the edit's guided x0 and eps; records the source's
            features for the energy."""
            s = sigmas[i]
            with torch.no_grad():
                cap.clear()
                _, den = g.evaluate([bank[i].to(dev), xt], s, [src_spec, edit_spec], mo, names=("source", "target"))
                ref = [f.detach() for f in feats()]
            info.evaluations += 1
            return den.to(xt.dtype), ref

        def guidance(xt, i, ref):
            """d(energy)/d(model input) for the edit latent at step i: (edit part, content part)."""
            s = sigmas[i]
            z = leaf(xt)
            with autograd(copy_saved=copy_saved):
                cap.clear()
                env.denoise(z, s, "positive")
                cur = feats()
                e_edit, e_con = energies(cur, ref, masks, w_edit, w_content, w_inpaint)
                g_edit = torch.autograd.grad(e_edit, z, retain_graph=True, allow_unused=True)[0] if e_edit.requires_grad else None
                g_con = torch.autograd.grad(e_con, z, allow_unused=True)[0] if e_con.requires_grad else None
            cap.clear()
            info.guided += 1
            info.energies.append((float(e_edit.detach()), float(e_con.detach())))
            # gradients w.r.t. the model's input (calculate_input: x / sqrt(1 + sigma^2) on EPS models = SD's latent)
            c_in = float(ms.calculate_input(torch.as_tensor(float(s)), torch.ones(())))
            zero = torch.zeros_like(xt)
            g_edit = zero if g_edit is None else g_edit.detach() / c_in
            g_con = zero if g_con is None else g_con.detach() / c_in
            return g_edit, g_con

        for i in range(n_run):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            gi = i + skip                                     # index in the full schedule (the paper's windows)
            back = rollbacks_at(gi) if s_next > 0 else 0
            for r in range(back + 1):
                den, ref = model_eps(x, i)
                eps = denoiser.to_eps(ms, x, den, s)
                x0 = den
                if guided_at(gi):
                    g_edit, g_con = guidance(x, i, ref)
                    if diffeditor:
                        grad = g_edit * region + g_con * (1.0 - region)
                    else:
                        grad = g_edit + g_con
                    # the guidance moves the derivative d = (x - x0) / sigma: eps on UNets (the paper's eps
                    # guidance), the velocity on flow models, where eps guidance would divide by 1 - sigma (0 at
                    # the full inversion's sigma 1)
                    x0 = den - s * energy_scale * ENERGY_UNIT * grad
                if sde_at(gi):
                    noise = torch.randn(x.shape, generator=gen).to(dev)
                    x_next = ddim_eta_step(ms, x, x0, eps, s, s_next, sde_strength * region, noise)
                    info.sde_steps += r == 0
                else:
                    x_next = ddim_eta_step(ms, x, x0, eps, s, s_next, 0.0, torch.zeros_like(x))
                if r < back:     # time travel: back up one step (DDIM inversion), guide again
                    with torch.no_grad():
                        den_n = env.denoise(x_next, sigmas[i + 1], "positive").x0
                    cap.clear()
                    x = denoiser.ddim_step(ms, x_next, den_n.to(x.dtype), s_next, s)
                    info.rollbacks += 1
                    info.evaluations += 1
                else:
                    x = x_next
            if progress is not None:
                progress(1, x0)
        return x

    out = run_with_gradients(clone, {"positive": positive, "negative": negative if use_neg else None}, program,
                             sigmas, bank[0].shape, seed=seed)
    import comfy.model_management
    out = out.detach().float().to(comfy.model_management.intermediate_device())
    return model.model.process_latent_out(out).to(samples.dtype), info
