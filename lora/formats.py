"""LoRA key layouts -> one entry per ComfyUI weight key, as exact low-rank factors or a dense delta.

Which LoRA names belong to which weight comes from ComfyUI itself (`comfy.lora.model_lora_keys_unet`
/ `model_lora_keys_clip` on the actual model), extended by the diffusers/PEFT spellings ComfyUI
0.3.x does not list (`unet.<diffusers name>.lora_A.weight`, `base_model.model.` wrappers). A tensor
name is split into (module prefix, component) by the longest prefix the key map knows.

Every supported format is reduced to delta = up @ down (scale folded into up), exactly:
  * LoRA / LoCon (kohya `lora_up/lora_down[/lora_mid]`, diffusers `lora.up`, PEFT `lora_B/lora_A`):
    delta = alpha/r * up @ down; the Tucker mid of a LoCon conv is folded into down.
  * LoHa: (A1 B1) * (A2 B2) (Hadamard) = Khatri-Rao: up = [a1_i * a2_j], down = [b1_i * b2_j],
    rank r1*r2 (Tucker variants fold their core into B first).
  * LoKr: kron(W1, W2) with W1 = A1 B1, W2 = A2 B2 = kron(A1, A2) @ kron(B1, B2) (mixed product);
    a full W1/W2 factor is written as W @ I or I @ W.
  * Full deltas (`.diff`, `.w_norm`), bias deltas (`.diff_b`, `.b_norm`): dense.
  * Weight-dependent adapters (DoRA `dora_scale`, OFT, BOFT, GLoRA): dense delta = ComfyUI's own
    adapter applied to the model's weight minus that weight (needs real weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# component name -> (kind, role)
_COMPONENTS = {
    "lora_up.weight": ("lora", "up"), "lora_down.weight": ("lora", "down"), "lora_mid.weight": ("lora", "mid"),
    "lora_B.weight": ("lora", "up"), "lora_A.weight": ("lora", "down"),
    "lora.up.weight": ("lora", "up"), "lora.down.weight": ("lora", "down"),
    "lora_B": ("lora", "up"), "lora_A": ("lora", "down"),
    "lora_linear_layer.up.weight": ("lora", "up"), "lora_linear_layer.down.weight": ("lora", "down"),
    "lora_B.default.weight": ("lora", "up"), "lora_A.default.weight": ("lora", "down"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w2": ("lokr", "w2"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"),
    "diff": ("diff", "diff"), "w_norm": ("diff", "diff"),
    "diff_b": ("bias", "diff_b"), "b_norm": ("bias", "diff_b"),
    "alpha": ("common", "alpha"), "dora_scale": ("common", "dora_scale"),
    "oft_blocks": ("adapter", "oft_blocks"), "rescale": ("adapter", "rescale"),
    "a1.weight": ("adapter", "a1"), "a2.weight": ("adapter", "a2"), "b1.weight": ("adapter", "b1"),
    "b2.weight": ("adapter", "b2"),
    "set_weight": ("unsupported", "set_weight"), "reshape_weight": ("unsupported", "reshape_weight"),
}
# Text-encoder prefixes a model-only application skips (as core LoraLoaderModelOnly does).
TEXT_ENCODER_PREFIXES = ("lora_te", "lora_prior_te", "text_encoder", "text_encoders.", "te_", "te1_", "te2_")


class LoraFormatError(ValueError):
    """A LoRA whose keys do not fit the model (lists the keys)."""

    def __init__(self, label: str, problem: str, keys: list[str]):
        self.keys = list(keys)
        shown = ", ".join(self.keys[:12]) + (f", ... ({len(self.keys)} in all)" if len(self.keys) > 12 else "")
        super().__init__(f"{label}: {problem}: {shown}")


def target_key(target) -> str:
    return target[0] if isinstance(target, tuple) else target


def _alias_keys(model, key_map: dict) -> None:
    """diffusers/PEFT spellings of SD-UNet module names that ComfyUI 0.3.x's key map lacks."""
    import comfy.utils
    cfg = getattr(getattr(model, "model_config", None), "unet_config", None)
    if not cfg:
        return
    try:
        diffusers_keys = comfy.utils.unet_to_diffusers(cfg)
    except Exception:  # pragma: no cover - configs this function does not understand
        return
    for k, ldm in diffusers_keys.items():
        if not k.endswith(".weight"):
            continue
        target = f"diffusion_model.{ldm}"
        base = k[:-len(".weight")]
        for name in (base, f"unet.{base}", f"base_model.model.{base}", f"unet.base_model.model.{base}"):
            key_map.setdefault(name, target)


class KeyResolver:
    """LoRA module names <-> ComfyUI weight keys (and their shapes) for one model (+ optional CLIP)."""

    def __init__(self, model=None, clip=None):
        import comfy.lora
        self.model, self.clip = model, clip
        self.key_map: dict = {}
        self.shapes: dict[str, tuple] = {}
        self.model_keys: set = set()
        self.clip_keys: set = set()
        if model is not None:
            base = model.model
            comfy.lora.model_lora_keys_unet(base, self.key_map)
            _alias_keys(base, self.key_map)
            for k, v in base.state_dict().items():
                self.shapes[k] = tuple(v.shape)
                self.model_keys.add(k)
        if clip is not None:
            cm = clip.cond_stage_model
            comfy.lora.model_lora_keys_clip(cm, self.key_map)
            for k, v in cm.state_dict().items():
                self.shapes[k] = tuple(v.shape)
                self.clip_keys.add(k)
        self._has_clip_g = any(k.startswith("clip_g.") for k in self.clip_keys)
        self._reverse: Optional[dict] = None

    # --- names -> targets ---------------------------------------------------------------------
    def split(self, name: str) -> tuple[Optional[str], str]:
        """(module prefix known to the key map, component), longest prefix first; (None, name) if none."""
        if "_lora." in name:
            p = name[:name.index("_lora.")]
            if p in self.key_map:
                comp = name[len(p) + 1:]          # "lora.up.weight"
                return p, comp
        i = len(name)
        while True:
            i = name.rfind(".", 0, i)
            if i <= 0:
                return None, name
            p = name[:i]
            if p in self.key_map:
                return p, name[i + 1:]

    def resolve(self, prefix: str):
        return self.key_map.get(prefix)

    def shape(self, target) -> tuple:
        key = target_key(target)
        shape = list(self.shapes[key])
        if isinstance(target, tuple) and target[1] is not None:
            dim, _start, length = target[1]
            shape[dim] = length
        return tuple(shape)

    def is_text_encoder(self, target) -> bool:
        return target_key(target) in self.clip_keys

    def weight(self, target) -> torch.Tensor:
        """The model's current weight for a target (narrowed for offset targets)."""
        key = target_key(target)
        if key in self.clip_keys:
            patcher, sd = self.clip.patcher, self.clip.cond_stage_model.state_dict()
        else:
            patcher, sd = self.model, self.model.model.state_dict()
        # The module is shared by every clone: if one of them is patched right now, its backup holds
        # the original weight.
        saved = getattr(patcher, "backup", {}).get(key)
        w = saved[0] if saved is not None else sd[key]
        if w.device.type == "meta":
            raise ValueError(f"{key}: the model has no weights loaded (meta device)")
        if isinstance(target, tuple) and target[1] is not None:
            w = w.narrow(*target[1])
        return w

    # --- targets -> output names ----------------------------------------------------------------
    def _rank_name(self, name: str, target) -> tuple:
        key = target_key(target)
        if key.startswith("diffusion_model."):
            ldm = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
            if name.startswith("lora_unet_") and name != ldm:
                score = 0            # kohya, diffusers module names (what A1111/kohya write for SD UNets)
            elif name == ldm:
                score = 1            # kohya, ComfyUI module names (kohya's Flux/DiT naming)
            elif name.startswith("lora_transformer_"):
                score = 2
            else:
                score = 5
        else:
            if self._has_clip_g and (name.startswith("lora_te1_") or name.startswith("lora_te2_")):
                score = 0
            elif not self._has_clip_g and name.startswith("lora_te_"):
                score = 0
            elif name.startswith("lora_te"):
                score = 1
            else:
                score = 5
        return score, len(name), name

    def name_for(self, target) -> str:
        """The LoRA module name EditKit writes for a target (kohya naming where ComfyUI knows one)."""
        if self._reverse is None:
            rev: dict = {}
            for name, t in self.key_map.items():
                rev.setdefault(t, []).append(name)
            self._reverse = rev
        names = self._reverse.get(target)
        if not names:
            raise KeyError(f"no LoRA name maps to {target}")
        return min(names, key=lambda n: self._rank_name(n, target))

    def names_for(self, target) -> list:
        self.name_for(target)
        return list(self._reverse.get(target, []))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

@dataclass
class Module:
    """One LoRA module: the tensors of one prefix, bound to one ComfyUI target."""
    prefix: str
    target: object                         # weight key or (key, offset)
    kind: str                              # lora | loha | lokr | diff | bias | adapter
    parts: dict = field(default_factory=dict)   # role -> tensor name in the source mapping
    shape: tuple = ()

    def tensor(self, source, role) -> torch.Tensor:
        return source[self.parts[role]]


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


@dataclass
class Factors:
    """delta (flattened to 2-D) = up @ down; `shape` is the target weight's shape."""
    up: torch.Tensor      # (out, R), float32
    down: torch.Tensor    # (R, in_flat), float32
    shape: tuple

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def dense(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape)


def _as_factor_pair(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix W as (A, B) with W = A @ B and inner size min(rows, cols)."""
    w = w.flatten(1)
    if w.shape[0] <= w.shape[1]:
        return torch.eye(w.shape[0], dtype=w.dtype), w
    return w, torch.eye(w.shape[1], dtype=w.dtype)


def _tucker_down(t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fold a LyCORIS Tucker core t (i, j, kh, kw) into b (j, in): (i, in*kh*kw)."""
    return torch.einsum("ijkl,jr->irkl", _f(t), _f(b).flatten(1)).flatten(1)


def factors(module: Module, source, strength: float = 1.0) -> Optional[Factors]:
    """Exact low-rank factors of a module's delta (alpha/rank scale and `strength` folded into up);
    None for modules that only have a dense form (full diffs, weight-dependent adapters)."""
    p, shape = module.parts, module.shape
    out = shape[0]
    if "dora_scale" in p or module.kind in ("diff", "bias", "adapter"):
        return None
    alpha = float(source[p["alpha"]].item()) if "alpha" in p else None
    if module.kind == "lora":
        up, down = _f(source[p["up"]]).flatten(1), _f(source[p["down"]])
        r = down.shape[0]
        if "mid" in p:
            mid = _f(source[p["mid"]])                       # (r_a, r_b, kh, kw)
            down = torch.einsum("bi,abkl->aikl", down.flatten(1), mid).flatten(1)
        else:
            down = down.flatten(1)
        scale = alpha / r if alpha is not None else 1.0
    elif module.kind == "loha":
        if "t1" in p:
            a1, b1 = _f(source[p["w1a"]]).t(), _tucker_down(source[p["t1"]], source[p["w1b"]])
            a2, b2 = _f(source[p["w2a"]]).t(), _tucker_down(source[p["t2"]], source[p["w2b"]])
        else:
            a1, b1 = _f(source[p["w1a"]]).flatten(1), _f(source[p["w1b"]]).flatten(1)
            a2, b2 = _f(source[p["w2a"]]).flatten(1), _f(source[p["w2b"]]).flatten(1)
        r1, r2 = a1.shape[1], a2.shape[1]
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], r1 * r2)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(r1 * r2, b1.shape[1])
        rank = _f(source[p["w1b"]]).shape[0]
        scale = alpha / rank if alpha is not None else 1.0
    elif module.kind == "lokr":
        dim = None
        if "w1" in p:
            a1, b1 = _as_factor_pair(_f(source[p["w1"]]))
        else:
            a1, b1 = _f(source[p["w1a"]]).flatten(1), _f(source[p["w1b"]]).flatten(1)
            dim = b1.shape[0]
        if "w2" in p:
            a2, b2 = _as_factor_pair(_f(source[p["w2"]]))
        elif "t2" in p:
            a2, b2 = _f(source[p["w2a"]]).t(), _tucker_down(source[p["t2"]], source[p["w2b"]])
            dim = _f(source[p["w2b"]]).shape[0]
        else:
            a2, b2 = _f(source[p["w2a"]]).flatten(1), _f(source[p["w2b"]]).flatten(1)
            dim = b2.shape[0]
        up, down = torch.kron(a1, a2), torch.kron(b1, b2)
        scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
        in_flat = 1
        for s in shape[1:]:
            in_flat *= s
        if up.shape[1] >= min(out, in_flat) and ("w1" in p or "w2" in p):
            return None      # the exact factorisation is no smaller than the matrix: use the dense form
    else:
        raise ValueError(f"{module.prefix}: cannot factor a {module.kind} module")
    in_flat = 1
    for s in shape[1:]:
        in_flat *= s
    if up.shape[0] != out or down.shape[1] != in_flat:
        raise ValueError(f"{module.prefix}: LoRA delta {tuple(up.shape[:1]) + tuple(down.shape[1:])} "
                         f"does not fit weight {module.target} of shape {shape}")
    return Factors(up * (scale * strength), down, tuple(shape))


def dense(module: Module, source, resolver: Optional[KeyResolver] = None, strength: float = 1.0) -> torch.Tensor:
    """The module's dense delta (float32, the target's shape), times `strength`."""
    fac = factors(module, source, strength)
    if fac is not None:
        return fac.dense()
    p, shape = module.parts, module.shape
    if module.kind in ("diff", "bias"):
        t = _f(source[p["diff" if module.kind == "diff" else "diff_b"]])
        if t.numel() != _numel(shape):
            raise ValueError(f"{module.prefix}: delta of shape {tuple(t.shape)} does not fit {module.target} {shape}")
        return t.reshape(shape) * strength
    # Weight-dependent: ComfyUI's adapter on the real weight, minus the weight.
    import comfy.lora
    if resolver is None:
        raise ValueError(f"{module.prefix}: a {module.kind}/DoRA module needs the model's weights")
    sub = {name: source[name] for name in p.values()}
    patches = comfy.lora.load_lora(sub, {module.prefix: module.target}, log_missing=False)
    if module.target not in patches:
        raise ValueError(f"{module.prefix}: ComfyUI could not read this module")
    w = resolver.weight(module.target).to(torch.float32)
    key = target_key(module.target)
    new = comfy.lora.calculate_weight([(1.0, patches[module.target], 1.0, None, None)], w.clone(), key)
    return (new - w).reshape(shape) * strength


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def natural_rank(module: Module, source) -> int:
    """The rank a module's own format has (LoRA r, LoHa r1*r2, LoKr product); min(dims) for dense."""
    p = module.parts
    shape = module.shape
    full = min(shape[0], _numel(shape[1:])) if len(shape) > 1 else 1
    try:
        if module.kind == "lora":
            return min(full, _shape_of(source, p["down"])[0])
        if module.kind == "loha":
            return min(full, _shape_of(source, p["w1b"])[0] * _shape_of(source, p["w2b"])[0])
        if module.kind == "lokr":
            r1 = min(_shape_of(source, p["w1"])[:2]) if "w1" in p else _shape_of(source, p["w1b"])[0]
            r2 = min(_shape_of(source, p["w2"])[0], _numel(_shape_of(source, p["w2"])[1:])) if "w2" in p \
                else _shape_of(source, p["w2b"])[0]
            return min(full, r1 * r2)
    except KeyError:
        pass
    return full


def _shape_of(source, name) -> tuple:
    if hasattr(source, "shape") and callable(getattr(source, "shape")):
        return tuple(source.shape(name))
    return tuple(source[name].shape)


# ---------------------------------------------------------------------------------------------
# Parsing one LoRA into modules
# ---------------------------------------------------------------------------------------------

@dataclass
class ParsedLora:
    label: str
    source: object                       # mapping name -> tensor (lazy file or dict)
    modules: dict                        # target -> Module
    skipped_text_encoder: list = field(default_factory=list)

    def module_for(self, target) -> Optional[Module]:
        return self.modules.get(target)


def parse(source, resolver: KeyResolver, label: str = "lora", skip_text_encoder: bool = False) -> ParsedLora:
    """Group a LoRA's tensors by module and bind each to a ComfyUI weight key.

    Raises LoraFormatError listing every key that matched no weight of the model, used a component
    EditKit cannot merge, or whose delta shape does not fit the weight."""
    groups: dict[str, dict] = {}
    unmatched, unsupported, skipped = [], [], []
    for name in source.keys():
        prefix, comp = resolver.split(name)
        if prefix is None:
            if skip_text_encoder and name.startswith(TEXT_ENCODER_PREFIXES):
                skipped.append(name)
            else:
                unmatched.append(name)
            continue
        if comp not in _COMPONENTS:
            unsupported.append(name)
            continue
        groups.setdefault(prefix, {})[comp] = name
    if unmatched:
        hint = ("" if resolver.clip is not None else " (text-encoder keys need the CLIP connected)")
        raise LoraFormatError(label, f"{len(unmatched)} keys match no weight of this model{hint}", unmatched)
    if unsupported:
        raise LoraFormatError(label, f"{len(unsupported)} keys have components EditKit cannot read", unsupported)
    modules: dict = {}
    bad_shape = []
    for prefix, comps in groups.items():
        target = resolver.resolve(prefix)
        kinds: dict[str, dict] = {}
        for comp, name in comps.items():
            kind, role = _COMPONENTS[comp]
            kinds.setdefault(kind, {})[role] = name
        common = kinds.pop("common", {})
        if "unsupported" in kinds:
            raise LoraFormatError(label, "these keys set or reshape weights and cannot be merged",
                                  list(kinds["unsupported"].values()))
        bias = kinds.pop("bias", None)
        if bias is not None:
            key = target_key(target)
            btarget = key[:-len(".weight")] + ".bias" if key.endswith(".weight") else None
            if btarget is None or btarget not in resolver.shapes:
                unmatched.extend(bias.values())
            else:
                modules[btarget] = Module(prefix, btarget, "bias", dict(bias), resolver.shape(btarget))
        if not kinds:
            if common and not bias:
                unmatched.extend(common.values())      # an alpha without weights
            continue
        if len(kinds) > 1:
            raise LoraFormatError(label, f"module {prefix} mixes formats {sorted(kinds)}", list(comps.values()))
        kind, roles = next(iter(kinds.items()))
        roles.update(common)
        need = {"lora": {"up", "down"}, "loha": {"w1a", "w1b", "w2a", "w2b"}}.get(kind, set())
        if kind == "lokr":
            ok = ("w1" in roles or {"w1a", "w1b"} <= roles.keys()) and \
                 ("w2" in roles or {"w2a", "w2b"} <= roles.keys())
            if not ok:
                raise LoraFormatError(label, f"LoKr module {prefix} is incomplete", list(comps.values()))
        if not need <= roles.keys():
            raise LoraFormatError(label, f"module {prefix} lacks {sorted(need - roles.keys())}", list(comps.values()))
        mod = Module(prefix, target, kind, roles, resolver.shape(target))
        if target in modules:
            raise LoraFormatError(label, f"two modules of this LoRA patch the same weight {target}",
                                  [modules[target].prefix, prefix])
        # Cheap shape check from the tensors' shapes (no data read).
        if not _shape_fits(mod, source):
            bad_shape.append(f"{prefix} -> {target_key(target)} {mod.shape}")
            continue
        modules[target] = mod
    if unmatched:
        raise LoraFormatError(label, f"{len(unmatched)} keys match no weight of this model", unmatched)
    if bad_shape:
        raise LoraFormatError(label, f"{len(bad_shape)} modules do not fit the model's weight shapes "
                                     f"(a LoRA for another base model?)", bad_shape)
    return ParsedLora(label, source, modules, skipped)


def _shape_fits(mod: Module, source) -> bool:
    p, shape = mod.parts, mod.shape
    out, in_flat = shape[0], _numel(shape[1:])
    try:
        if mod.kind == "lora":
            up, down = _shape_of(source, p["up"]), _shape_of(source, p["down"])
            if "mid" in p:
                return up[0] == out and down[1] * _numel(_shape_of(source, p["mid"])[2:]) == in_flat
            return up[0] == out and _numel(down[1:]) == in_flat
        if mod.kind == "loha" and "t1" not in p:
            return _shape_of(source, p["w1a"])[0] == out and _numel(_shape_of(source, p["w1b"])[1:]) == in_flat
        if mod.kind in ("diff", "bias"):
            return _numel(_shape_of(source, p["diff" if mod.kind == "diff" else "diff_b"])) == _numel(shape)
    except (KeyError, IndexError):
        return False
    return True     # LoKr / Tucker shapes are checked when the factors are built


def unmatched_keys(source, resolver: KeyResolver, skip_text_encoder: bool = False) -> tuple[list, list]:
    """(names no weight of the model claims, text-encoder names skipped because no CLIP was given)."""
    bad, skipped = [], []
    for name in source.keys():
        prefix, _ = resolver.split(name)
        if prefix is None:
            if skip_text_encoder and name.startswith(TEXT_ENCODER_PREFIXES):
                skipped.append(name)
            else:
                bad.append(name)
    return bad, skipped
