"""Per-block LoRA strengths: the block layout comes from the model, the syntax is the common one.

Units a weight key belongs to (from its ComfyUI name):
  BASE         the text encoder, and model weights outside the numbered blocks (embeddings, final layer)
  INnn / OUTnn UNet `input_blocks.nn` / `output_blocks.nn`;  MID (sub-blocks M0, M1, ...) `middle_block`
  Dnn / Snn    DiT double blocks (Flux `double_blocks`, SD3 `joint_blocks`) / Flux `single_blocks`

Vector syntax (comma-separated numbers, an optional "NAME:" prefix as in preset files), one value
per slot, in one of the forms the model's layout gives (lengths are computed, never tabulated):
  * attention form: BASE, the input blocks that hold attention, MID, the output blocks that hold
    attention: 17 values on SD1.5, 12 on SDXL (the LoRA Block Weight convention). A block without a
    slot (no attention, e.g. SD1.5 IN03 or SDXL IN01) follows the nearest slotted block before it in
    the same half of the UNet (or after it, if none is before).
  * full form: BASE, IN00..INnn, MID, OUT00..OUTnn (26 values on SD1.5, 20 on SDXL).
  * LyCORIS form: BASE, IN01..INnn, M0..M2, OUT00..OUTnn (27 on SD1.5, 21 on SDXL; IN00 follows IN01).
  * DiT form: BASE, D00..Dn, S00..Sm (Flux dev/schnell: 1 + 19 + 38 = 58).
Key=value syntax: "BASE=1, IN=0.5, IN04=1, OUT03-OUT05=0, MID=0, D=1, S00-S09=0, DEFAULT=1"
(indices are the model's real block indices; later items override earlier ones; DEFAULT, default 1,
applies to every unit not named). A preset name is also accepted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..core.errors import EditKitInputError

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class BlockLayout:
    architecture: str                       # "unet" | "dit" | "other"
    n_input: int = 0
    n_middle: int = 0
    n_output: int = 0
    attn_input: tuple = ()
    attn_output: tuple = ()
    n_double: int = 0
    n_single: int = 0
    has_text_encoder: bool = True

    # slot lists of each vector form -------------------------------------------------------------
    def forms(self) -> dict:
        f = {}
        if self.architecture == "unet":
            f["attention"] = ["BASE"] + [f"IN{i:02d}" for i in self.attn_input] + ["MID"] + \
                             [f"OUT{i:02d}" for i in self.attn_output]
            f["full"] = ["BASE"] + [f"IN{i:02d}" for i in range(self.n_input)] + ["MID"] + \
                        [f"OUT{i:02d}" for i in range(self.n_output)]
            f["lycoris"] = ["BASE"] + [f"IN{i:02d}" for i in range(1, self.n_input)] + \
                           [f"M{j}" for j in range(self.n_middle)] + [f"OUT{i:02d}" for i in range(self.n_output)]
        elif self.architecture == "dit":
            f["dit"] = ["BASE"] + [f"D{i:02d}" for i in range(self.n_double)] + [f"S{i:02d}" for i in range(self.n_single)]
        return f

    def units(self) -> list[str]:
        """Every unit, in model order: BASE, IN.., M.., OUT.. / D.., S.."""
        if self.architecture == "unet":
            return (["BASE"] + [f"IN{i:02d}" for i in range(self.n_input)] + [f"M{j}" for j in range(self.n_middle)]
                    + [f"OUT{i:02d}" for i in range(self.n_output)])
        if self.architecture == "dit":
            return ["BASE"] + [f"D{i:02d}" for i in range(self.n_double)] + [f"S{i:02d}" for i in range(self.n_single)]
        return ["BASE"]

    def describe(self) -> str:
        parts = []
        for name, slots in self.forms().items():
            parts.append(f"{name} form, {len(slots)} values: {','.join(slots)}")
        return "; ".join(parts) if parts else "this model has no numbered blocks: only BASE / DEFAULT apply"


def layout(model) -> BlockLayout:
    """Discover the block layout from the model's module tree (works on meta-device models too)."""
    from ..core import introspect
    arch = introspect.architecture(model)
    dm = introspect._base(model).diffusion_model
    if arch == "unet":
        lay = introspect.attention_layout(model)
        return BlockLayout("unet", n_input=len(dm.input_blocks), n_middle=len(dm.middle_block),
                           n_output=len(dm.output_blocks), attn_input=tuple(lay.blocks("input")),
                           attn_output=tuple(lay.blocks("output")))
    if arch in ("flux", "mmdit"):
        lay = introspect.attention_layout(model)
        nd = sum(1 for b in lay.dit_blocks if b.kind == "double_block")
        ns = sum(1 for b in lay.dit_blocks if b.kind == "single_block")
        return BlockLayout("dit", n_double=nd, n_single=ns)
    return BlockLayout("other")


_KEY_PATTERNS = [
    (re.compile(r"^diffusion_model\.input_blocks\.(\d+)\."), "IN{:02d}"),
    (re.compile(r"^diffusion_model\.middle_block\.(\d+)\."), "M{}"),
    (re.compile(r"^diffusion_model\.output_blocks\.(\d+)\."), "OUT{:02d}"),
    (re.compile(r"^diffusion_model\.(?:double_blocks|joint_blocks)\.(\d+)\."), "D{:02d}"),
    (re.compile(r"^diffusion_model\.single_blocks\.(\d+)\."), "S{:02d}"),
]


def unit_of(key: str) -> str:
    """The unit of a ComfyUI weight key (model keys start with `diffusion_model.`; the rest is text encoder)."""
    for pat, fmt in _KEY_PATTERNS:
        m = pat.match(key)
        if m:
            return fmt.format(int(m.group(1)))
    return "BASE"


def group_label(unit: str) -> str:
    """Coarse label for statistics: TE/BASE, INnn, MID, OUTnn, Dnn, Snn."""
    return "MID" if unit.startswith("M") and unit[1:].isdigit() else unit


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# Vectors of the LoRA Block Weight convention for the 17-slot (SD1.5-style) attention form.
_SD17 = {
    "SD-INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "SD-MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
    "SD-OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "SD-OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "SD-OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}
# Presets computed from the layout (valid on every model that has the blocks they name).
_GENERIC = {
    "ALL": "DEFAULT=1",
    "NONE": "DEFAULT=0",
    "HALF": "DEFAULT=0.5",
    "TEXT ENCODER ONLY": "DEFAULT=0, BASE=1",
    "MODEL ONLY": "DEFAULT=1, BASE=0",
    "INPUT": "DEFAULT=0, BASE=1, IN=1",
    "MIDDLE": "DEFAULT=0, BASE=1, MID=1",
    "OUTPUT": "DEFAULT=0, BASE=1, OUT=1",
    "INPUT+MIDDLE": "DEFAULT=0, BASE=1, IN=1, MID=1",
    "MIDDLE+OUTPUT": "DEFAULT=0, BASE=1, MID=1, OUT=1",
    "DOUBLE BLOCKS": "DEFAULT=0, BASE=1, D=1",
    "SINGLE BLOCKS": "DEFAULT=0, BASE=1, S=1",
    "DOUBLE FRONT": "DEFAULT=0, BASE=1, D=front",
    "DOUBLE MIDDLE": "DEFAULT=0, BASE=1, D=middle",
    "DOUBLE TAIL": "DEFAULT=0, BASE=1, D=tail",
}
PRESETS = list(_GENERIC) + list(_SD17)
_UNET_ONLY = {"INPUT", "MIDDLE", "OUTPUT", "INPUT+MIDDLE", "MIDDLE+OUTPUT"}
_DIT_ONLY = {"DOUBLE BLOCKS", "SINGLE BLOCKS", "DOUBLE FRONT", "DOUBLE MIDDLE", "DOUBLE TAIL"}


def preset_spec(name: str, lay: BlockLayout) -> Optional[str]:
    key = name.strip().upper()
    if key in _GENERIC:
        if key in _UNET_ONLY and lay.architecture != "unet":
            raise ValueError(f"preset {name} needs a UNet model (this one is {lay.architecture})")
        if key in _DIT_ONLY and lay.architecture != "dit":
            raise ValueError(f"preset {name} needs a DiT model with double/single blocks")
        spec = _GENERIC[key]
        if "front" in spec or "middle" in spec or "tail" in spec:
            n = lay.n_double
            a, b = n // 3, (2 * n) // 3
            rng = {"front": (0, a - 1), "middle": (a, b - 1), "tail": (b, n - 1)}
            which = spec.split("D=")[1]
            lo, hi = rng[which]
            spec = spec.replace(f"D={which}", f"D{lo:02d}-D{hi:02d}=1" if hi >= lo else "")
        return spec
    if key in _SD17:
        if len(lay.forms().get("attention", [])) != 17:
            raise ValueError(f"preset {name} is a 17-value SD1.5 vector; this model's attention form has "
                             f"{len(lay.forms().get('attention', []))} values")
        return _SD17[key]
    return None


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

@dataclass
class BlockWeights:
    layout: BlockLayout
    weights: dict = field(default_factory=dict)      # unit -> weight
    form: str = ""

    def weight(self, key: str) -> float:
        return self.weights.get(unit_of(key), self.weights.get("BASE", 1.0))

    def text(self) -> str:
        def fmt(v):
            return f"{v:g}"
        items = [f"{u}={fmt(w)}" for u, w in self.weights.items()]
        return ", ".join(items)


def _fill_unslotted(lay: BlockLayout, w: dict, slotted_in: set, slotted_out: set) -> None:
    for prefix, n, slotted in (("IN", lay.n_input, slotted_in), ("OUT", lay.n_output, slotted_out)):
        have = sorted(slotted)
        for i in range(n):
            if i in slotted or not have:
                continue
            before = [j for j in have if j < i]
            src = before[-1] if before else have[0]
            w[f"{prefix}{i:02d}"] = w[f"{prefix}{src:02d}"]


def _parse_vector(values: list[float], lay: BlockLayout, names: dict) -> BlockWeights:
    n = len(values)
    forms = lay.forms()
    for form, slots in forms.items():
        if len(slots) != n:
            continue
        w = {}
        for slot, v in zip(slots, values):
            if slot == "MID":
                for j in range(lay.n_middle):
                    w[f"M{j}"] = v
            else:
                w[slot] = v
        if form == "attention":
            _fill_unslotted(lay, w, set(lay.attn_input), set(lay.attn_output))
        elif form == "lycoris" and lay.n_input:
            w["IN00"] = w.get("IN01", w["BASE"])
        out = {u: w.get(u, 1.0) for u in lay.units()}
        return BlockWeights(lay, out, form)
    accepted = "; ".join(f"{k} form = {len(s)} values ({','.join(s)})" for k, s in forms.items()) or "none"
    raise ValueError(f"{n} values do not fit this model's layout; accepted: {accepted}")


_ITEM = re.compile(r"^(BASE|TE|DEFAULT|IN|MID|M|OUT|D|DOUBLE|S|SINGLE)(\d+)?(?:\s*-\s*(?:IN|MID|M|OUT|D|DOUBLE|S|SINGLE)?(\d+))?$")


def _parse_items(text: str, lay: BlockLayout) -> BlockWeights:
    items = [s.strip() for s in re.split(r"[,;\n]+", text) if s.strip()]
    pairs = []
    default = 1.0
    for item in items:
        if "=" not in item:
            raise ValueError(f"'{item}' is not NAME=value (mixing a vector with NAME=value items is not allowed)")
        name, val = (s.strip() for s in item.split("=", 1))
        if not re.fullmatch(_NUM, val):
            raise ValueError(f"'{item}': {val!r} is not a number")
        m = _ITEM.match(name.upper().replace("_", ""))
        if not m:
            raise ValueError(f"'{name}' is not a block name (BASE, DEFAULT, IN, INnn, MID, Mn, OUT, OUTnn, D, Dnn, S, Snn, "
                             f"ranges like OUT03-OUT05)")
        if m.group(1) == "DEFAULT":
            default = float(val)
        else:
            pairs.append((m.group(1), m.group(2), m.group(3), float(val), name))
    units = lay.units()
    w = {u: default for u in units}
    fam = {"IN": "IN", "OUT": "OUT", "MID": "M", "M": "M", "D": "D", "DOUBLE": "D", "S": "S", "SINGLE": "S"}
    counts = {"IN": lay.n_input, "OUT": lay.n_output, "M": lay.n_middle, "D": lay.n_double, "S": lay.n_single}
    for kind, a, b, v, raw in pairs:
        if kind in ("BASE", "TE"):
            w["BASE"] = v
            continue
        f = fam[kind]
        n = counts[f]
        if n == 0:
            raise ValueError(f"'{raw}': this model has no {kind} blocks ({lay.describe()})")
        lo = int(a) if a is not None else 0
        hi = int(b) if b is not None else (lo if a is not None else n - 1)
        if lo > hi or hi >= n:
            raise ValueError(f"'{raw}': {kind} indices on this model are 0..{n - 1}")
        for i in range(lo, hi + 1):
            w[f"M{i}" if f == "M" else f"{f}{i:02d}"] = v
    return BlockWeights(lay, w, "names")


def parse(spec: str, lay: BlockLayout) -> BlockWeights:
    """Block weights from a vector, NAME=value items or a preset name (see the module docstring)."""
    text = (spec or "").strip()
    if not text:
        return BlockWeights(lay, {u: 1.0 for u in lay.units()}, "names")
    preset = preset_spec(text, lay)
    if preset is not None:
        return parse(preset, lay) if preset else BlockWeights(lay, {u: 0.0 for u in lay.units()}, "names")
    if "=" in text:
        return _parse_items(text, lay)
    if ":" in text:                            # "NAME:1,0,..." lines of preset files
        head, tail = text.split(":", 1)
        preset = preset_spec(head, lay) if not re.fullmatch(_NUM, head.strip()) else None
        text = tail.strip() if preset is None else preset
        if preset is not None:
            return parse(preset, lay)
    values = [s for s in re.split(r"[,\s]+", text) if s]
    for s in values:
        if not re.fullmatch(_NUM, s):
            raise ValueError(f"'{s}' is not a number or a preset name (presets: {', '.join(PRESETS)})")
    return _parse_vector([float(s) for s in values], lay, {})


def parse_for_node(spec: str, lay: BlockLayout, node: str, input_name: str) -> BlockWeights:
    try:
        return parse(spec, lay)
    except ValueError as e:
        raise EditKitInputError(node, input_name, str(e), f"this model: {lay.describe()}") from None


def apply(lora, resolver, model, clip, weight_of, strength_model: float = 1.0, strength_clip: float = 1.0,
          label: str = "lora"):
    """Patch clones of model (and clip) with a LoRA state dict, each weight key at
    strength * weight_of(key); keys whose strength is 0 get no patch at all. ComfyUI's own loader
    (`comfy.lora.load_lora`) builds the patches, so every format core ComfyUI applies works here.
    Returns (model, clip, {target: strength})."""
    import comfy.lora
    import comfy.lora_convert

    from .formats import LoraFormatError, target_key, unmatched_keys
    lora = comfy.lora_convert.convert_lora(lora)
    bad, _skipped = unmatched_keys(lora, resolver, skip_text_encoder=clip is None)
    if bad:
        hint = "" if clip is not None else " (text-encoder keys need the CLIP connected)"
        raise LoraFormatError(label, f"{len(bad)} keys match no weight of this model{hint}", bad)
    patches = comfy.lora.load_lora(lora, resolver.key_map, log_missing=False)
    groups_m: dict = {}
    groups_c: dict = {}
    applied = {}
    for target, patch in patches.items():
        key = target_key(target)
        is_clip = key in resolver.clip_keys
        s = (strength_clip if is_clip else strength_model) * float(weight_of(key))
        if s == 0:
            continue
        applied[target] = s
        (groups_c if is_clip else groups_m).setdefault(s, {})[target] = patch
    m = model.clone()
    for s, group in groups_m.items():
        m.add_patches(group, s)
    c = None
    if clip is not None:
        c = clip.clone()
        for s, group in groups_c.items():
            c.add_patches(group, s)
    return m, c, applied
