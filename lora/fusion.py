"""Mix-of-Show gradient fusion (Gu et al., NeurIPS 2023): several concept LoRAs -> one LoRA.

Per linear layer with weight W0, concept i's LoRA gives W_i = W0 + D_i, and X_i are that layer's input
activations (rows) recorded while the model *with LoRA i* samples concept i's prompts. The fused weight
reproduces every concept's layer outputs on its own activations in the least-squares sense:

    W* = argmin_W  sum_i ||X_i W^T - X_i W_i^T||^2 / n_i  +  lam ||W - W0||^2

(n_i = concept i's number of rows, so each concept weighs the same whatever its prompt count; lam =
`ridge` * trace(G) / d keeps unexcited directions at W0). With the Gram matrices G_i = X_i^T X_i / n_i the
normal equations give, in closed form and without W0:

    D* = W* - W0 = (sum_i D_i G_i) (sum_i G_i + lam I)^-1        (float64)

D* is written as one LoRA: a rank-`rank` factorisation (truncated SVD) or, with rank 0, the exact full
delta in ComfyUI's `.diff` form; core Load LoRA applies either. Weights that are not linear layers
(LoCon convolutions, bias deltas) are merged by concat (the exact sum), as in Mix-of-Show; text-encoder
keys are left out (reported).

Activations are recorded on a clone: the LoRA is applied with ComfyUI's own loader and each target layer
is an object patch of a shallow module copy whose forward adds x^T x to a Gram matrix (weights shared,
the user's model and modules untouched), while ComfyUI's sampler samples the concept's prompts.
`output_error` scores any merged delta on the same Gram matrices, so the report compares the fusion with
concat and TIES (lora/merge.py) on exactly the activations it was fitted to.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import merge
from .formats import KeyResolver, ParsedLora, dense, target_key
from .st_io import StreamWriter

COMPARE = ("concat", "ties")


@dataclass
class Concept:
    """One concept: its LoRA (ComfyUI state dict and parsed modules) and its prompts as
    (positive, negative) CONDITIONING pairs."""
    label: str
    lora: dict
    parsed: ParsedLora
    prompts: list


@dataclass
class Capture:
    """How the activations are recorded: `samples` images per prompt, sampled at `latent`'s shape."""
    latent: torch.Tensor            # (1, C, H, W) empty latent in LATENT space
    steps: int = 20
    cfg: float = 7.5
    seed: int = 0
    samples: int = 1
    sampler: str = "euler"
    scheduler: str = "normal"


class GramRecorder:
    """Gram matrices sum x x^T of each recorded layer's input rows (float64 on the CPU)."""

    def __init__(self):
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.active = True

    def add(self, key: str, x: torch.Tensor) -> None:
        if not self.active:
            return
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.double() if x.device.type == "cpu" else x.float()
        g = (x.t() @ x).to("cpu", torch.float64)
        if key in self.grams:
            self.grams[key] += g
        else:
            self.grams[key] = g
        self.rows[key] = self.rows.get(key, 0) + x.shape[0]

    def normalized(self) -> dict[str, torch.Tensor]:
        """G / n per layer (the mean of x x^T over the rows)."""
        return {k: g / max(self.rows[k], 1) for k, g in self.grams.items()}


class _RecordingForward:
    def __init__(self, module, key: str, recorder: GramRecorder):
        self.module, self.key, self.recorder = module, key, recorder

    def __call__(self, *args, **kwargs):
        x = args[0] if args else kwargs["input"]
        self.recorder.add(self.key, x)
        return type(self.module).forward(self.module, *args, **kwargs)


def recording(module: torch.nn.Module, key: str, recorder: GramRecorder) -> torch.nn.Module:
    """A shallow copy of a linear module (same weights, same class) whose forward records its input."""
    c = copy.copy(module)
    # The copy must not inherit the original's load state: ComfyUI marks a module whose weight it has
    # patched (comfy_patched_weights) and skips it on the next load, so a copy made while another clone's
    # LoRA was patched in would keep the base weight once that clone is unpatched.
    c.__dict__.pop("comfy_patched_weights", None)
    if "prev_comfy_cast_weights" in c.__dict__:
        c.comfy_cast_weights = c.__dict__.pop("prev_comfy_cast_weights")
    for name in ("weight_function", "bias_function"):
        if name in c.__dict__:
            setattr(c, name, [])
    c.forward = _RecordingForward(c, key, recorder)
    return c


def _module_path(key: str) -> str:
    return key[:-len(".weight")]


def linear_targets(model, parsed: list[ParsedLora]) -> list[str]:
    """The weight keys of the diffusion model's linear layers that any of the LoRAs patches (model order)."""
    base = model.model
    keys = {target_key(t) for p in parsed for t, m in p.modules.items()
            if not isinstance(t, tuple) and m.kind != "bias"}
    out = []
    for name, mod in base.named_modules():
        key = name + ".weight"
        if key in keys and isinstance(mod, torch.nn.Linear) and key.startswith("diffusion_model."):
            out.append(key)
    return out


def collect_grams(model, lora: dict, keys: list[str], prompts: list, capture: Capture) -> GramRecorder:
    """Sample `prompts` with `lora` applied (core's loader, on a clone) and record the Gram matrix of every
    layer in `keys`. The object patches live on the clone only; the recorder is off once this returns."""
    import comfy.sample
    import comfy.sd
    m, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    rec = GramRecorder()
    for key in keys:
        path = _module_path(key)
        m.add_object_patch(path, recording(m.get_model_object(path), key, rec))
    latent = comfy.sample.fix_empty_latent_channels(m, capture.latent)
    try:
        for pos, neg in prompts:
            for s in range(int(capture.samples)):
                seed = int(capture.seed) + s
                noise = comfy.sample.prepare_noise(latent, seed)
                comfy.sample.sample(m, noise, int(capture.steps), float(capture.cfg), capture.sampler,
                                    capture.scheduler, pos, neg, latent, denoise=1.0, seed=seed,
                                    disable_pbar=True)
    finally:
        rec.active = False
    return rec


def _ridge(g: torch.Tensor, ridge: float) -> float:
    d = g.shape[0]
    scale = float(torch.diagonal(g).sum()) / d
    return float(ridge) * (scale if scale > 0 else 1.0)


def solve(deltas: list[torch.Tensor], grams: list[torch.Tensor], ridge: float = 1e-8) -> torch.Tensor:
    """D* = (sum_i D_i G_i)(sum_i G_i + lam I)^-1 in float64 (D_i: (out, in), G_i: (in, in))."""
    a = sum(d.double() @ g for d, g in zip(deltas, grams))
    gs = sum(grams)
    lam = _ridge(gs, ridge)
    m = gs + lam * torch.eye(gs.shape[0], dtype=torch.float64)
    # D* m = a  <=>  m D*^T = a^T (m symmetric positive definite)
    return torch.linalg.solve(m, a.t()).t()


def output_error(delta: torch.Tensor, target: torch.Tensor, gram: torch.Tensor) -> float:
    """mean ||x (delta - target)^T||^2 over the rows whose Gram is `gram` = trace(E G E^T)."""
    e = (delta.double() - target.double())
    return float(((e @ gram) * e).sum())


@dataclass
class FusionReport:
    path: str
    labels: list
    rank: int
    n_linear: int = 0
    n_other: int = 0
    skipped_text_encoder: int = 0
    # method -> per-concept sum over layers of the output error, and each concept's own output energy
    errors: dict = field(default_factory=dict)
    energy: list = field(default_factory=list)
    deltas: dict = field(default_factory=dict)     # linear key -> fused delta as saved (float32), for tests

    def relative(self, method: str) -> list[float]:
        """Per concept: output error of the method / the concept's own LoRA output change (0 = exact)."""
        return [e / en if en > 0 else 0.0 for e, en in zip(self.errors[method], self.energy)]

    def summary(self) -> str:
        lines = [f"fused {len(self.labels)} LoRAs: {self.n_linear} linear layers by least squares"
                 + (f", {self.n_other} other weights by concat" if self.n_other else "")
                 + (f", rank {self.rank}" if self.rank else ", full delta (.diff)")]
        if self.skipped_text_encoder:
            lines.append(f"text-encoder keys not fused (model layers only): {self.skipped_text_encoder}")
        lines.append("relative output error on each concept's own activations (0 % = its LoRA exactly):")
        for method in ("fusion",) + COMPARE:
            if method in self.errors:
                cells = ", ".join(f"{lab} {100 * r:.1f} %" for lab, r in zip(self.labels, self.relative(method)))
                lines.append(f"  {method}: {cells}")
        return "\n".join(lines)


def fuse_to_file(model, concepts: list[Concept], resolver: KeyResolver, capture: Capture, path: str,
                 rank: int = 0, ridge: float = 1e-8, dtype=torch.float16, density: float = 0.5,
                 metadata: Optional[dict] = None, progress: Optional[Callable[[int, int], None]] = None,
                 keep_deltas: bool = False) -> FusionReport:
    """Record each concept's activations, solve every linear layer in closed form, write one LoRA at `path`
    (kohya names; rank 0 = full `.diff`) and score fusion, concat and TIES on the recorded activations."""
    if not concepts:
        raise ValueError("at least one concept")
    parsed = [c.parsed for c in concepts]
    keys = linear_targets(model, parsed)
    total = len(concepts) + 1
    grams = []
    for i, c in enumerate(concepts):
        grams.append(collect_grams(model, c.lora, keys, c.prompts, capture).normalized())
        if progress:
            progress(i + 1, total)
    report = FusionReport(path, [c.label for c in concepts], int(rank))
    report.skipped_text_encoder = sum(len(p.skipped_text_encoder) for p in parsed)
    report.errors = {m: [0.0] * len(concepts) for m in ("fusion",) + COMPARE}
    report.energy = [0.0] * len(concepts)
    meta = {"editkit.method": "mix_of_show_fusion", "editkit.rank": str(rank), "editkit.ridge": str(ridge),
            "editkit.sources": json.dumps([c.label for c in concepts]),
            "editkit.capture": json.dumps({"steps": capture.steps, "cfg": capture.cfg, "seed": capture.seed,
                                           "samples": capture.samples, "prompts": [len(c.prompts) for c in concepts]}),
            "ss_network_module": "networks.lora"}
    meta.update(metadata or {})
    writer = StreamWriter(path, meta)
    linear = set(keys)
    order = {k: i for i, k in enumerate(resolver.shapes)}
    targets = sorted({t for p in parsed for t in p.modules if not resolver.is_text_encoder(t)},
                     key=lambda t: (order.get(target_key(t), 1 << 30), str(t)))
    params = merge.MergeParams(method="concat", dtype=dtype)
    try:
        for t in targets:
            if t in linear:
                shape = resolver.shape(t)
                deltas = []
                for p in parsed:
                    mod = p.modules.get(t)
                    deltas.append(dense(mod, p.source, resolver).reshape(shape).double() if mod is not None
                                  else torch.zeros(shape, dtype=torch.float64))
                gs = [g.get(t, torch.zeros(shape[1], shape[1], dtype=torch.float64)) for g in grams]
                fused = solve(deltas, gs, ridge)
                name = resolver.name_for(t)
                if rank > 0 and rank < min(shape):
                    lr = merge.svd_dense(fused.float(), int(rank), exact=True)
                    merge._store_lowrank(writer, name, shape, lr.up, lr.down, dtype)
                    saved = (lr.up @ lr.down).double()
                else:
                    writer.add(f"{name}.diff", fused.to(dtype))
                    saved = fused.to(dtype).double()
                if keep_deltas:
                    report.deltas[t] = saved.float()
                ties = merge.combine_dense([d.float().clone() for d in deltas], [1.0] * len(deltas), "ties", density)
                merged = {"fusion": saved, "concat": sum(deltas), "ties": ties.double()}
                for i, (d, g) in enumerate(zip(deltas, gs)):
                    report.energy[i] += output_error(d, torch.zeros_like(d), g)
                    for method, m in merged.items():
                        report.errors[method][i] += output_error(m, d, g)
                report.n_linear += 1
            else:
                parts = [(1.0, p.modules[t], p.source, i) for i, p in enumerate(parsed) if t in p.modules]
                merge._merge_target(t, parts, resolver, params, writer)
                report.n_other += 1
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if progress:
        progress(total, total)
    for k in report.errors:
        report.errors[k] = [e if math.isfinite(e) else float("inf") for e in report.errors[k]]
    return report
