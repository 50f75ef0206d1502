"""The training loop (one owner): seeded batches, AdamW + gradient accumulation on fp32 master
parameters, EMA, progress with the loss, interrupt -> checkpoint, resume.

`train(model, conds, examples, params, settings, ...)` runs inside `core.gradients.run_with_gradients`
on a gradient clone of `model`; trainable weight wrappers (LoRA) are added to that clone by `install`,
a trainable text context (textual inversion) comes from `context(cond_name)`. The user's model, its
weights and its patches are never changed; only `params` are updated.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ..core import gradients as G
from ..core.introspect import architecture
from . import objective


@dataclass(frozen=True)
class Settings:
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accumulation: int = 1
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    ema_decay: float = 0.0          # 0: no EMA
    seed: int = 0
    checkpointing: bool = False     # gradient checkpointing (recompute blocks in backward)


@dataclass(frozen=True)
class Example:
    """One training latent (sampler space, (C, H, W)), the name of its condition set, its loss weight
    (prior-preservation examples carry the prior weight)."""
    latent: torch.Tensor
    cond: str
    weight: float = 1.0


@dataclass
class Result:
    losses: list = field(default_factory=list)   # per optimizer step (mean over the accumulated batch)
    steps: int = 0
    resumed_from: int = 0


class TrainingInterrupted(Exception):
    """Raised after the interrupt checkpoint was written (path); the user's model is unchanged."""

    def __init__(self, path: Optional[str], step: int):
        self.path, self.step = path, step
        super().__init__(f"training interrupted at step {step}" + (f"; checkpoint {path}" if path else ""))


class EMA:
    """Exponential moving average of parameters (fp32 shadow copies). warmup: the decay at optimizer step n is
    min(decay, (1 + n) / (10 + n)), so early averages do not remember the random initialisation."""

    def __init__(self, params, decay: float, warmup: bool = False):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.shadow = [p.detach().float().clone() for p in params]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params, step: int = 0) -> None:
        d = self.decay_at(step)
        for s, p in zip(self.shadow, params):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))


class Optimizer:
    """The training core's optimizer step (one owner): AdamW on the (fp32 master) parameters, optional
    gradient-norm clipping, EMA after every step. Gradient accumulation: call backward on each micro-batch
    (its loss divided by the number of micro-batches) between zero_grad() and step()."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 1e-2, ema_decay: float = 0.0,
                 ema_warmup: bool = False, clip_norm: Optional[float] = None, steps: int = 0, groups=()):
        """groups: further (parameters, learning rate) groups (e.g. a text encoder's LoRA at its own rate)."""
        self.params = list(params) + [p for g, _ in groups for p in g]
        self.opt = torch.optim.AdamW([{"params": list(params)}] + [{"params": list(g), "lr": float(r)} for g, r in groups],
                                     lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self.ema = EMA(self.params, ema_decay, ema_warmup) if ema_decay > 0 else None
        self.clip_norm, self.steps = clip_norm, int(steps)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, lr: Optional[float] = None) -> None:
        if lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.params, self.steps)


def master_parameters(tensors) -> list[torch.nn.Parameter]:
    """fp32 trainable copies (the master weights the optimizer updates)."""
    with torch.inference_mode(False):
        return [torch.nn.Parameter(t.detach().float().clone()) for t in tensors]


def _fingerprint(params, settings: Settings, n_examples: int) -> dict:
    s = asdict(settings)
    s["betas"] = list(s["betas"])
    return {"shapes": [list(p.shape) for p in params], "settings": s, "examples": n_examples}


def save_checkpoint(path: str, step: int, params, opt, ema, gen, losses, fingerprint) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    torch.save({"step": step, "params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict(),
                "ema": None if ema is None else [s.cpu() for s in ema.shadow], "generator": gen.get_state(),
                "losses": list(losses), "fingerprint": fingerprint}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _default_stop() -> bool:
    import comfy.model_management
    return comfy.model_management.processing_interrupted()


class _Progress:
    """ComfyUI's progress bar with the loss as progress text and the preview samples as its image."""

    def __init__(self, model, total: int, node_id: Optional[str]):
        from ..core.progress import StepProgress
        self.bar = StepProgress(model, total)
        self.total, self.node_id = total, node_id

    def update(self, step: int, loss: float, preview_x0: Optional[torch.Tensor] = None) -> None:
        self.bar.show(step, preview_x0)
        if self.node_id is None:
            return
        try:
            from server import PromptServer
            inst = PromptServer.instance
            if hasattr(inst, "send_progress_text"):
                inst.send_progress_text(f"step {step}/{self.total}  loss {loss:.4f}", self.node_id)
        except Exception:   # no server (headless scripts): the bar alone
            pass


PREVIEW_NEGATIVE = "preview_negative"


@dataclass(frozen=True)
class Preview:
    """A preview sample every `every` optimizer steps (0: off) with the current weights: `steps` deterministic
    (DDIM) steps from fixed noise (seed), the condition `cond` (default: the first example's) with its trainable
    context, CFG `cfg` against `negative` (a CONDITIONING; None: no CFG). Shown as the progress bar's image;
    on_latent(step, x0) receives it too. Sampling uses its own generator and no gradients: the training run is
    the same with or without previews."""
    every: int = 0
    steps: int = 8
    seed: int = 0
    cfg: float = 1.0
    negative: object = None
    cond: Optional[str] = None
    on_latent: Optional[Callable[[int, torch.Tensor], None]] = None


def sample_preview(env, preview: Preview, cond: str, shape, context=None) -> torch.Tensor:
    """A small deterministic sample (sampler space, (1, C, H, W)) through the gradient clone's current weights."""
    import comfy.samplers

    from ..core import denoiser
    ms = env.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", max(int(preview.steps), 1)).float().cpu()
    noise = torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(int(preview.seed)))
    x = denoiser.initial_latent(ms, noise, torch.zeros_like(noise), sigmas[0], max_denoise=True).to(env.device)
    neg = PREVIEW_NEGATIVE if preview.negative is not None else None
    with torch.no_grad():
        ctx = context(cond) if context is not None else None
        for i in range(len(sigmas) - 1):
            pred = env.denoise(x, sigmas[i].to(env.device), positive=cond, negative=neg, cfg=float(preview.cfg),
                               context=ctx)
            x = denoiser.ddim_step(ms, x, pred.x0, sigmas[i], sigmas[i + 1])
    return x.detach()


def train(model, conds: dict, examples: list[Example], params: list[torch.nn.Parameter], settings: Settings,
          install: Optional[Callable[[object], None]] = None,
          context: Optional[Callable[[str], torch.Tensor]] = None,
          checkpoint_path: Optional[str] = None, resume: Optional[str] = None,
          on_step: Optional[Callable[[int, float], None]] = None,
          stop: Optional[Callable[[], bool]] = None, node_id: Optional[str] = None,
          preview: Optional[Preview] = None, groups=()) -> Result:
    """Optimize `params` to minimize the diffusion loss of `model` (+ installed wrappers) on `examples`.

    conds: named CONDITIONINGs (each example names one). install(clone): adds the trainable weight
    wrappers to the gradient clone. context(name): a differentiable cross-attention context replacing
    that condition's own (textual inversion). stop(): checked before every step (default: ComfyUI's
    interrupt); when it fires the state is saved to checkpoint_path and TrainingInterrupted raised.
    resume: a checkpoint written by an interrupted run with the same settings; the run continues exactly
    where it stopped (same batches, same optimizer state). preview: a sample every N steps (Preview).
    groups: further (parameters, learning rate) groups trained with `params`."""
    if not examples:
        raise ValueError("no training examples")
    shape = tuple(examples[0].latent.shape)
    stop = stop or _default_stop
    groups = [(list(g), float(r)) for g, r in groups]
    fingerprint = _fingerprint(list(params) + [p for g, _ in groups for p in g], settings, len(examples))
    if groups:
        fingerprint["group_lrs"] = [r for _, r in groups]
    # DiT blocks and CLIP text encoders update tensors in place: autograd keeps copies (core/gradients.autograd)
    copy_saved = architecture(model) != "unet" or context is not None
    result = Result()
    sigmas = torch.tensor([float(model.get_model_object("model_sampling").sigma_max), 0.0])

    def program(env):
        ms = env.model_sampling
        gen = torch.Generator().manual_seed(int(settings.seed))
        optim = Optimizer(params, settings.learning_rate, settings.betas, settings.weight_decay, settings.ema_decay,
                          groups=groups)
        opt, ema, every_param = optim.opt, optim.ema, optim.params
        start, losses = 0, []
        if resume:
            ck = load_checkpoint(resume)
            if ck.get("fingerprint") != fingerprint:
                raise ValueError("the checkpoint was written by a run with other settings or parameters")
            with torch.no_grad():
                for p, v in zip(every_param, ck["params"]):
                    p.copy_(v.to(p.device, p.dtype))
            opt.load_state_dict(ck["optimizer"])
            if ema is not None and ck["ema"] is not None:
                ema.shadow = [s.to(p.device) for s, p in zip(ck["ema"], every_param)]
            gen.set_state(ck["generator"])
            start, losses = int(ck["step"]), list(ck["losses"])
            optim.steps = start
            result.resumed_from = start
        latents = torch.stack([e.latent for e in examples]).float()
        weights = torch.tensor([float(e.weight) for e in examples])
        names = [e.cond for e in examples]
        bs, accum = int(settings.batch_size), int(settings.grad_accumulation)
        progress = _Progress(model, settings.steps, node_id)
        every = int(preview.every) if preview is not None else 0
        preview_cond = (preview.cond or names[0]) if every > 0 else None
        for step in range(start, settings.steps):
            if stop():
                path = None
                if checkpoint_path:
                    path = save_checkpoint(checkpoint_path, step, every_param, opt, ema, gen, losses, fingerprint)
                raise TrainingInterrupted(path, step)
            optim.zero_grad()
            step_loss = 0.0
            for _ in range(accum):
                idx = torch.randint(0, len(examples), (bs,), generator=gen)
                sig = objective.sample_sigmas(ms, bs, gen)
                eps = torch.randn((bs,) + shape, generator=gen)
                for name in dict.fromkeys(names[int(i)] for i in idx):
                    rows = [r for r in range(bs) if names[int(idx[r])] == name]
                    sel = idx[rows]
                    x0 = latents[sel].to(env.device)
                    s = sig[rows].to(env.device)
                    with G.autograd(copy_saved=copy_saved):
                        x_t = objective.noisy_latent(ms, x0, eps[rows].to(env.device), s)
                        ctx = context(name) if context is not None else None
                        pred = env.denoise(x_t, s, positive=name, context=ctx)
                        per_row = objective.per_row_loss(pred, x0)
                        loss = (per_row * weights[sel].to(per_row.device)).sum() / (bs * accum)
                        loss.backward()
                    step_loss += float(loss.detach())
            optim.step()
            losses.append(step_loss)
            shown = None
            if every > 0 and (step + 1) % every == 0:
                shown = sample_preview(env, preview, preview_cond, shape, context)
                if preview.on_latent is not None:
                    preview.on_latent(step + 1, shown)
            progress.update(step + 1, step_loss, shown)
            if on_step is not None:
                on_step(step + 1, step_loss)
        if ema is not None:
            ema.copy_to(every_param)
        result.losses, result.steps = losses, settings.steps

    if preview is not None and preview.every > 0 and preview.negative is not None:
        conds = dict(conds, **{PREVIEW_NEGATIVE: preview.negative})
    G.run_with_gradients(model, conds, program, sigmas, (1,) + shape, checkpointing=settings.checkpointing,
                         seed=int(settings.seed), prepare=install)
    return result


def evaluate(model, conds: dict, examples: list[Example], seed: int = 1234, repeats: int = 4,
             install: Optional[Callable[[object], None]] = None,
             context: Optional[Callable[[str], torch.Tensor]] = None) -> float:
    """The mean diffusion loss over `examples`, each at `repeats` fixed (seeded) noise levels and noises:
    a loss on a fixed batch, comparable before and after training."""
    shape = tuple(examples[0].latent.shape)
    sigmas = torch.tensor([float(model.get_model_object("model_sampling").sigma_max), 0.0])
    out = {}

    def program(env):
        ms = env.model_sampling
        gen = torch.Generator().manual_seed(int(seed))
        total, count = 0.0, 0
        with torch.no_grad():
            for e in examples:
                sig = objective.sample_sigmas(ms, repeats, gen).to(env.device)
                eps = torch.randn((repeats,) + shape, generator=gen).to(env.device)
                x0 = e.latent.float().to(env.device).expand((repeats,) + shape)
                x_t = objective.noisy_latent(ms, x0, eps, sig)
                ctx = context(e.cond) if context is not None else None
                pred = env.denoise(x_t, sig, positive=e.cond, context=ctx)
                total += float(objective.per_row_loss(pred, x0).sum()) * float(e.weight)
                count += repeats
        out["loss"] = total / max(count, 1)

    G.run_with_gradients(model, conds, program, sigmas, (1,) + shape, seed=int(seed), prepare=install)
    return out["loss"]
