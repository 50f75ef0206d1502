"""What kind of model is this? Family, parameterization and attention layout, discovered from
the model object itself (config class, model_sampling, module tree), never from a table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Family names are stable strings: they appear in error messages and README rows.
SD1, SD2, SDXL, SDXL_REFINER, SD3, FLUX = "sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux"
UNET_OTHER, DIT_OTHER, UNKNOWN = "unet", "dit", "unknown"
FAMILY_LABELS = {SD1: "SD1.x", SD2: "SD2.x", SDXL: "SDXL", SDXL_REFINER: "SDXL refiner", SD3: "SD3 (MMDiT)",
                 FLUX: "Flux", UNET_OTHER: "SD-style UNet", DIT_OTHER: "DiT", UNKNOWN: "unknown"}

# Parameterizations.
EPS, V_PREDICTION, FLOW, EDM, X0, OTHER = "eps", "v_prediction", "flow", "edm", "x0", "other"


def _base(model):
    """Accept a ModelPatcher or a BaseModel."""
    return getattr(model, "model", model)


def architecture(model) -> str:
    """'unet', 'mmdit', 'flux' or 'other', from the diffusion model's class."""
    dm = getattr(_base(model), "diffusion_model", None)
    if dm is None:
        return "other"
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    if isinstance(dm, UNetModel):
        return "unet"
    try:
        from comfy.ldm.flux.model import Flux as FluxDiT
        if isinstance(dm, FluxDiT):
            return "flux"
    except ImportError:  # pragma: no cover - very old ComfyUI
        pass
    try:
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
        if isinstance(dm, MMDiT):
            return "mmdit"
    except ImportError:  # pragma: no cover
        pass
    return "other"


def model_family(model) -> str:
    """The checkpoint family, from ComfyUI's detected model config; falls back to the architecture."""
    import comfy.supported_models as sm
    cfg = getattr(_base(model), "model_config", None)
    checks = [("SDXLRefiner", SDXL_REFINER), ("SDXL", SDXL), ("SD15", SD1), ("SD20", SD2), ("SD3", SD3), ("Flux", FLUX)]
    for cls_name, fam in checks:
        cls = getattr(sm, cls_name, None)
        if cls is not None and cfg is not None and isinstance(cfg, cls):
            # Flux2 and other later subclasses share the Flux block layout.
            return fam
    arch = architecture(model)
    return {"unet": UNET_OTHER, "flux": FLUX, "mmdit": SD3}.get(arch, DIT_OTHER if arch != "other" else UNKNOWN)


def model_sampling(model):
    return model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else _base(model).model_sampling


def parameterization(model) -> str:
    import comfy.model_sampling as ms_mod
    ms = model_sampling(model)
    if isinstance(ms, ms_mod.CONST):
        return FLOW
    if isinstance(ms, ms_mod.EDM):
        return EDM
    if isinstance(ms, ms_mod.V_PREDICTION):
        return V_PREDICTION
    if isinstance(ms, ms_mod.X0):
        return X0
    if isinstance(ms, ms_mod.EPS):
        return EPS
    return OTHER


# ---------------------------------------------------------------------------------------------
# Attention layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttnSite:
    """One transformer block inside a UNet SpatialTransformer: where its attn1/attn2 live."""
    block: str            # "input" | "middle" | "output"
    number: int           # index into input_blocks / output_blocks (0 for middle)
    depth: int            # index inside the SpatialTransformer (ComfyUI's block_index)
    order: int            # execution order over the whole UNet, 0-based
    downsample: int       # latent-to-layer spatial factor (1, 2, 4, ...)
    channels: int
    heads: int
    dim_head: int
    cross: bool           # has a cross-attention (attn2) to the text context

    @property
    def key(self) -> tuple:
        """The 3-tuple replace-patch key ComfyUI looks up first."""
        return (self.block, self.number, self.depth)

    def resolution(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        h, w, f = latent_h, latent_w, 1
        while f < self.downsample:  # stride-2 convs with padding 1 give ceil(h / 2)
            h, w, f = (h + 1) // 2, (w + 1) // 2, f * 2
        return h, w


@dataclass(frozen=True)
class DitBlock:
    kind: str      # "double_block" | "single_block" (the "dit" replace-patch names)
    index: int
    order: int


@dataclass(frozen=True)
class UnetBlock:
    """One numbered UNet block (input_blocks[i], the middle block, output_blocks[i]), attention or not."""
    block: str            # "input" | "middle" | "output"
    number: int
    downsample: int       # latent-to-layer factor the block works at (its input resolution)
    out_downsample: int   # factor of its output (differs after a Downsample / Upsample inside it)
    channels: int         # channels of its output
    attention: bool


@dataclass(frozen=True)
class Layout:
    architecture: str
    sites: tuple = ()          # AttnSite, UNets
    dit_blocks: tuple = ()     # DitBlock, DiTs
    unet_blocks: tuple = ()    # UnetBlock, UNets: every numbered block in execution order
    dit_patch: int = 0         # DiTs: latent pixels per image-token side
    dit_hidden: int = 0        # DiTs: channels of the image tokens between blocks

    def blocks(self, block: str) -> list[int]:
        return sorted({s.number for s in self.sites if s.block == block})

    def levels(self) -> list[int]:
        """Distinct downsample factors that hold attention, finest first."""
        return sorted({s.downsample for s in self.sites})

    def unet_block(self, block: str, number: int) -> Optional[UnetBlock]:
        return next((b for b in self.unet_blocks if (b.block, b.number) == (block, number)), None)

    def decoder_levels(self) -> list[tuple]:
        """UNet decoder levels, coarsest first: the output-block numbers working at one resolution
        (SD1.x: 4 levels of 3 blocks, SDXL: 3 of 3; diffusers calls a level an "up block")."""
        levels: list[list[int]] = []
        last = None
        for b in self.unet_blocks:
            if b.block != "output":
                continue
            if b.downsample != last:
                levels.append([])
                last = b.downsample
            levels[-1].append(b.number)
        return [tuple(lv) for lv in levels]


def _transformer_blocks(module):
    from comfy.ldm.modules.attention import SpatialTransformer
    for sub in module:
        if isinstance(sub, SpatialTransformer):
            return sub.transformer_blocks
    return None


def _is_down(sub) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample
    return isinstance(sub, Downsample)


def _is_up(sub) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample
    return isinstance(sub, Upsample)


def _out_channels(module, default: int) -> int:
    """Channels leaving a UNet block: its last layer that says (ResBlock, Up/Downsample, conv, transformer)."""
    for sub in reversed(list(module)):
        for attr in ("out_channels", "in_channels"):
            c = getattr(sub, attr, None)
            if isinstance(c, int):
                return c
    return default


def attention_layout(model) -> Layout:
    """Discover the attention sites of a UNet, or the blocks of a DiT, from the module tree."""
    arch = architecture(model)
    dm = _base(model).diffusion_model
    if arch == "unet":
        sites, order, factor = [], 0, 1
        blocks, channels = [], 0

        def add_block(block, number, mod, before, after):
            nonlocal channels
            channels = _out_channels(mod, channels)
            blocks.append(UnetBlock(block, number, before, after, channels, _transformer_blocks(mod) is not None))

        def add(block, number, mod, factor):
            nonlocal order
            tbs = _transformer_blocks(mod)
            if tbs is None:
                return
            for depth, tb in enumerate(tbs):
                sites.append(AttnSite(block, number, depth, order, factor, tb.attn1.to_q.in_features,
                                      tb.n_heads, tb.d_head, getattr(tb, "attn2", None) is not None))
                order += 1

        for i, mod in enumerate(dm.input_blocks):
            if any(_is_down(s) for s in mod):
                add_block("input", i, mod, factor, factor * 2)
                factor *= 2
            else:
                add("input", i, mod, factor)
                add_block("input", i, mod, factor, factor)
        add("middle", 0, dm.middle_block, factor)
        if dm.middle_block is not None:
            add_block("middle", 0, dm.middle_block, factor, factor)
        for i, mod in enumerate(dm.output_blocks):
            add("output", i, mod, factor)
            up = any(_is_up(s) for s in mod)
            add_block("output", i, mod, factor, factor // 2 if up else factor)
            if up:
                factor //= 2
        return Layout("unet", sites=tuple(sites), unet_blocks=tuple(blocks))
    if arch in ("flux", "mmdit"):
        geometry = dict(dit_patch=dit_patch_size(dm), dit_hidden=_dit_hidden(dm))
    if arch == "flux":
        blocks = [DitBlock("double_block", i, i) for i in range(len(dm.double_blocks))]
        n = len(blocks)
        blocks += [DitBlock("single_block", i, n + i) for i in range(len(dm.single_blocks))]
        return Layout("flux", dit_blocks=tuple(blocks), **geometry)
    if arch == "mmdit":
        return Layout("mmdit", dit_blocks=tuple(DitBlock("double_block", i, i) for i in range(len(dm.joint_blocks))),
                      **geometry)
    return Layout(arch)


def dit_tokens(dm, x, c_crossattn) -> tuple[int, tuple[int, int]]:
    """A DiT forward's token geometry: (text tokens before the image ones, image token grid (h, w))
    for the latent x and the context c_crossattn it is called with."""
    p = dit_patch_size(dm)
    h, w = x.shape[-2], x.shape[-1]
    txt = c_crossattn.shape[1] if c_crossattn is not None else 0
    txt += getattr(dm, "register_length", 0) or 0
    return txt, ((h + p - 1) // p, (w + p - 1) // p)


def dit_patch_size(dm) -> int:
    """Latent pixels per image token side."""
    p = getattr(dm, "patch_size", 2)
    if hasattr(dm, "x_embedder") and hasattr(dm.x_embedder, "patch_size"):
        p = dm.x_embedder.patch_size[0]
    return p if isinstance(p, int) else int(p[0])


def _dit_hidden(dm) -> int:
    h = getattr(dm, "hidden_size", None)
    if isinstance(h, int):
        return h
    proj = getattr(getattr(dm, "x_embedder", None), "proj", None)      # SD3: the patch embedding's width
    return int(getattr(proj, "out_channels", 0) or 0)


def describe(model) -> str:
    fam = model_family(model)
    return f"{FAMILY_LABELS.get(fam, fam)} ({parameterization(model)})"


def require_architecture(model, allowed: set, node: str, input_name: str = "model", what: Optional[str] = None):
    from .errors import EditKitInputError
    arch = architecture(model)
    if arch not in allowed:
        names = {"unet": "UNet models (SD1.x, SD2.x, SDXL)", "flux": "Flux", "mmdit": "SD3"}
        ok = ", ".join(names.get(a, a) for a in sorted(allowed))
        raise EditKitInputError(node, input_name, f"{what or 'this node'} does not support a {describe(model)} model",
                                f"connect one of: {ok}")
    return arch
