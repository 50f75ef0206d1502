"""Build UI-format workflows (the JSON the canvas saves and loads) from a short description.

Used by scripts/build_workflows.py so shipped workflows stay in step with the node definitions:
widget order, control_after_generate values and output slots all come from the definitions.
"""
from __future__ import annotations

from .workflow import node_inputs


class Node:
    def __init__(self, builder, nid, class_type, pos, widgets, title, size):
        self.b, self.id, self.type, self.pos, self.title, self.size = builder, nid, class_type, pos, title, size
        self.widgets = dict(widgets)
        self.links_in: dict[str, int] = {}
        self.links_out: dict[int, list[int]] = {}

    def out(self, slot):
        """Reference to an output, by index or by name (RETURN_NAMES, else the type)."""
        if isinstance(slot, str):
            names = self.b.output_names(self.type)
            slot = names.index(slot)
        return (self, slot)


class WorkflowBuilder:
    def __init__(self, node_classes: dict):
        self.classes = node_classes
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def output_names(self, class_type):
        cls = self.classes[class_type]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        return list(names)

    def add(self, class_type: str, pos=(0, 0), title: str | None = None, size=(320, 160), **widgets) -> Node:
        if class_type not in self.classes:
            raise KeyError(f"unknown node type {class_type}")
        node = Node(self, len(self.nodes) + 1, class_type, list(pos), widgets, title, list(size))
        self.nodes.append(node)
        return node

    def connect(self, source, target: Node, input_name: str):
        src, slot = source
        link_id = len(self.links) + 1
        types = self.classes[src.type].RETURN_TYPES
        self.links.append([link_id, src.id, slot, target.id, None, types[slot]])
        target.links_in[input_name] = link_id
        src.links_out.setdefault(slot, []).append(link_id)
        return link_id

    def group(self, title: str, bounding, color="#3f789e"):
        self.groups.append({"title": title, "bounding": list(bounding), "color": color, "font_size": 24, "flags": {}})

    def build(self) -> dict:
        out_nodes = []
        link_index = {l[0]: l for l in self.links}
        for order, n in enumerate(self.nodes):
            defs = node_inputs(n.type, self.classes)
            inputs, widgets_values = [], []
            for d in defs:
                linked = n.links_in.get(d.name)
                if d.is_widget:
                    if d.name not in n.widgets:
                        default = d.options.get("default")
                        if default is None and d.type == "COMBO":
                            cls_spec = self.classes[n.type].INPUT_TYPES()
                            spec = (cls_spec.get("required", {}) | cls_spec.get("optional", {}))[d.name]
                            opts = spec[0] if isinstance(spec[0], (list, tuple)) else spec[1].get("options", [])
                            default = opts[0] if opts else None
                        if default is None:  # what the front end's widget starts with
                            default = {"STRING": "", "INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(d.type)
                        n.widgets[d.name] = default
                    widgets_values.append(n.widgets.get(d.name))
                    if d.has_control:
                        widgets_values.append("fixed")
                    if d.options.get("image_upload"):
                        widgets_values.append("image")
                    if linked is not None:
                        inputs.append({"name": d.name, "type": d.type, "widget": {"name": d.name}, "link": linked})
                else:
                    inputs.append({"name": d.name, "type": d.type, "link": linked})
            for i, inp in enumerate(inputs):
                if inp["link"] is not None:
                    link_index[inp["link"]][4] = i
            types = self.classes[n.type].RETURN_TYPES
            names = self.output_names(n.type)
            outputs = [{"name": names[i], "type": t, "links": n.links_out.get(i, []), "slot_index": i}
                       for i, t in enumerate(types)]
            node = {"id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order, "mode": 0,
                    "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": n.type},
                    "widgets_values": widgets_values}
            if n.title:
                node["title"] = n.title
            out_nodes.append(node)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": out_nodes,
                "links": self.links, "groups": self.groups, "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}
