"""UI-format workflows (what the canvas saves) -> API-format prompts (what /prompt executes).

The conversion follows the front end's own rules, using the node definitions (the data behind
/object_info): widget values are assigned to widget inputs in definition order, INT/COMBO inputs
with control_after_generate and image-upload combos carry one extra serialized value, linked
widgets become links, Reroute and PrimitiveNode are resolved away, muted nodes are dropped and
bypassed nodes pass their matching input through.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    pass


@dataclass
class InputDef:
    name: str
    type: str
    options: dict = field(default_factory=dict)

    @property
    def is_widget(self) -> bool:
        if self.options.get("forceInput"):
            return False
        return self.type in WIDGET_TYPES

    @property
    def has_control(self) -> bool:
        """The front end adds a 'control after generate' widget: INT inputs with control_after_generate,
        or (unless it is explicitly false) INT inputs named seed / noise_seed; COMBOs when asked to."""
        flag = self.options.get("control_after_generate")
        if self.type == "INT" and flag is None:
            return self.name in ("seed", "noise_seed")
        return bool(flag)

    @property
    def extra_values(self) -> int:
        """Values the front end serializes after this widget's own (seed control, upload button)."""
        n = 0
        if self.has_control:
            n += 1
        if self.options.get("image_upload") or self.options.get("video_upload") or self.options.get("audio_upload"):
            n += 1
        return n


def input_spec(class_type: str, node_defs: dict) -> dict:
    """{"required": {...}, "optional": {...}} of a node type, from node classes (in-process) or /object_info entries."""
    entry = node_defs[class_type]
    if isinstance(entry, dict):  # an /object_info entry (server mode)
        return entry.get("input") or {}
    return entry.INPUT_TYPES()


def output_types(class_type: str, node_defs: dict) -> list[str]:
    entry = node_defs[class_type]
    if isinstance(entry, dict):
        return [t if isinstance(t, str) else "COMBO" for t in entry.get("output") or []]
    return [t if isinstance(t, str) else "COMBO" for t in entry.RETURN_TYPES]


def display_name(class_type: str, node_defs: dict) -> str:
    """The title the front end gives a new node of this type (its display name, else the type)."""
    entry = node_defs.get(class_type)
    if isinstance(entry, dict):  # /object_info
        return entry.get("display_name") or class_type
    if entry is not None and hasattr(entry, "GET_NODE_INFO_V1"):  # V3 node class
        return entry.GET_NODE_INFO_V1().get("display_name") or class_type
    import nodes  # V1 node classes: ComfyUI's display-name table, as /object_info reports it
    return getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", {}).get(class_type) or class_type


def node_inputs(class_type: str, node_classes: dict) -> list[InputDef]:
    """Inputs of a node type in definition order; node_classes maps type -> class, or is /object_info."""
    spec = input_spec(class_type, node_classes)
    out = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            t = value[0] if isinstance(value, (list, tuple)) else value
            opts = value[1] if isinstance(value, (list, tuple)) and len(value) > 1 and isinstance(value[1], dict) else {}
            if isinstance(t, (list, tuple)):
                t = "COMBO"
            out.append(InputDef(name, str(t), dict(opts)))
    return out


def is_ui_format(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_format(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def load(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path}: not a JSON file ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and "prompt" in data and is_api_format(data["prompt"]):
        data = data["prompt"]  # a saved /prompt request body
    if not (is_ui_format(data) or is_api_format(data)):
        raise WorkflowError(f"{path}: not a ComfyUI workflow (neither the UI format with nodes/links nor the API format)")
    return data


def _expand_zip(defs: list[InputDef], values: list):
    """(def, value) pairs, a widget's control value paired with the same def."""
    i = 0
    for d in defs:
        for _ in range(2 if d.has_control else 1):
            if i < len(values):
                yield d, values[i]
            i += 1


def _assign_widgets(node: dict, defs: list[InputDef]) -> dict:
    values = node.get("widgets_values")
    widgets = [d for d in defs if d.is_widget]
    if values is None:
        return {}
    if isinstance(values, dict):
        return {d.name: values[d.name] for d in widgets if d.name in values}
    # Files saved before forceInput inputs lost their widget still carry a value for them (the
    # front end's migrateWidgetsValues drops those values when the count says so).
    legacy = [d for d in defs if d.is_widget or (d.options.get("forceInput") and d.type in WIDGET_TYPES)]
    if len(legacy) > len(widgets) and len(values) == sum(2 if d.has_control else 1 for d in legacy):
        values = [v for d, v in _expand_zip(legacy, values) if d.is_widget]
    with_extras = sum(1 + d.extra_values for d in widgets)
    out, i = {}, 0
    use_extras = len(values) >= with_extras or len(values) > len(widgets)
    for d in widgets:
        if i >= len(values):
            break
        out[d.name] = values[i]
        i += 1 + (d.extra_values if use_extras else 0)
    return out


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """Convert a UI-format workflow to an API prompt. Raises WorkflowError naming unknown node types."""
    if "definitions" in workflow and workflow["definitions"].get("subgraphs"):
        from .subgraphs import flatten  # noqa: WPS433 (optional, only for workflows that use subgraphs)
        workflow = flatten(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)

    unknown = [(n["id"], n["type"]) for n in nodes.values()
               if n["type"] not in VIRTUAL and n["type"] not in node_classes and n.get("mode", 0) not in (MODE_NEVER, MODE_BYPASS)]
    if unknown:
        names = ", ".join(f"{t} (node {i})" for i, t in unknown)
        raise WorkflowError(f"unknown node types: {names} — install the pack that provides them")

    def resolve(link_id, seen=()):
        """Follow a link back through Reroutes and bypassed nodes: (node_id, slot) | ('value', v) | None."""
        if link_id is None or link_id not in links:
            return None
        origin, slot, _, _, ltype = links[link_id]
        src = nodes.get(origin)
        if src is None or origin in seen:
            return None
        mode = src.get("mode", 0)
        if src["type"] == "Reroute":
            ins = src.get("inputs") or []
            return resolve(ins[0].get("link"), seen + (origin,)) if ins else None
        if src["type"] == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            out_type = (src.get("outputs") or [{}])[slot].get("type") if slot < len(src.get("outputs") or []) else ltype
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], seen + (origin,))
            return None
        return (origin, slot)

    prompt = {}
    for nid, node in nodes.items():
        if node["type"] in VIRTUAL or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        defs = node_inputs(node["type"], node_classes)
        inputs = _assign_widgets(node, defs)
        for inp in node.get("inputs") or []:
            name = inp.get("widget", {}).get("name") if isinstance(inp.get("widget"), dict) else None
            name = name or inp.get("name")
            if inp.get("link") is None:
                continue
            r = resolve(inp["link"])
            if r is None:
                inputs.pop(name, None) if not any(d.name == name and d.is_widget for d in defs) else None
                continue
            if r[0] == "value":
                inputs[name] = r[1]
            else:
                inputs[name] = [str(r[0]), r[1]]
        # Like the front end's Export (API): every node carries its title (clients look nodes up by it).
        title = node.get("title") or display_name(node["type"], node_classes)
        prompt[str(nid)] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def to_api(data: dict, node_classes: dict) -> dict:
    if is_api_format(data):
        missing = [(k, v["class_type"]) for k, v in data.items() if v["class_type"] not in node_classes]
        if missing:
            names = ", ".join(f"{t} (node {i})" for i, t in missing)
            raise WorkflowError(f"unknown node types: {names} — install the pack that provides them")
        return data
    return ui_to_api(data, node_classes)
