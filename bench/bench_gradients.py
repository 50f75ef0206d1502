"""The gradient core's cost: one differentiable prediction + backward w.r.t. the latent (what a drag or
null-text step costs) vs one plain no-grad prediction, and what autograd keeps for backward, with and
without gradient checkpointing. SD1.5 architecture (random weights, host dtype), 32x32 latent."""
import torch

from common import interleaved, sd15

TITLE = "Gradient core: a differentiable step vs a plain prediction (SD1.5 layout, 32x32 latent)"


def run():
    from editkit.builtin_models.fullsize import sd15_conditioning
    from editkit.core import denoiser as D
    from editkit.core import gradients as G
    model, cond = sd15(), sd15_conditioning()
    lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    sigmas = D.schedule(model, "normal", 10)
    saved = {}

    def counting(key):
        def pack(t):
            saved[key] = saved.get(key, 0) + t.numel() * t.element_size()
            return t
        return pack

    def arm(key, checkpointing=False, grad=True, count=False):
        def program(env):
            x = G.leaf(lat.to(env.device), requires_grad=grad)
            s = env.sigmas[3]
            if not grad:
                with torch.no_grad():
                    return env.denoise(x, s).x0.sum()
            with G.autograd():
                if count:         # an inner hook replaces autograd()'s copies: it sees what would be kept
                    saved[key] = 0
                    with torch.autograd.graph.saved_tensors_hooks(counting(key), lambda t: t):
                        out = env.denoise(x, s).x0.float().square().mean()
                else:
                    out = env.denoise(x, s).x0.float().square().mean()
                out.backward()
            return x.grad

        return lambda: G.run_with_gradients(model, {"positive": cond}, program, sigmas, lat.shape,
                                            checkpointing=checkpointing)

    arms = {"plain prediction (no grad)": arm("plain", grad=False),
            "forward + backward": arm("grad"),
            "forward + backward, checkpointing": arm("ckpt", checkpointing=True)}
    with torch.inference_mode():
        t = interleaved(arms, repeats=3)
        arm("grad", count=True)()
        arm("ckpt", checkpointing=True, count=True)()
    base = t["plain prediction (no grad)"]
    keys = {"forward + backward": "grad", "forward + backward, checkpointing": "ckpt"}
    rows = []
    for name, secs in t.items():
        k = keys.get(name)
        rows.append({"run": name, "time ratio": f"{secs / base:.2f}",
                     "kept for backward": f"{saved[k] / 2 ** 20:.0f} MiB" if k else "-"})
    return rows
