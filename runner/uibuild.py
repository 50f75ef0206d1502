"""Build UI-format workflows (the JSON the canvas saves and loads) from a short description.

Used by scripts/build_workflows.py so shipped workflows stay in step with the node definitions:
widget order, control_after_generate values and output slots all come from the definitions. Nodes
are laid out automatically (columns by data flow, stacked with room for their titles and previews),
so a workflow definition names node types, widgets and links only; layout.check() is the test.

Every node gets the properties the front end writes when it saves a workflow: "Node name for S&R",
"cnr_id" and "ver" (the pack's registry id and version for EditKit nodes, comfy-core and the ComfyUI
version for core nodes), so the front end does not ask the registry which pack a node comes from.
"""
from __future__ import annotations

from . import layout
from .workflow import display_name, node_inputs

NOTE_TYPES = ("MarkdownNote", "Note")
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"


class Node:
    def __init__(self, builder, nid, class_type, widgets, title, size, col, properties):
        self.b, self.id, self.type, self.title, self.size, self.col = builder, nid, class_type, title, size, col
        self.widgets = dict(widgets)
        self.links_in: dict[str, int] = {}
        self.links_out: dict[int, list[int]] = {}
        self.properties = dict(properties or {})
        self.pos = [0, 0]

    def out(self, slot):
        """Reference to an output, by index or by name (RETURN_NAMES, else the type)."""
        if isinstance(slot, str):
            names = [str(n).lower() for n in self.b.output_names(self.type)]
            if slot.lower() not in names:
                raise ValueError(f"{self.type} has no output {slot!r} (outputs: {', '.join(names)})")
            slot = names.index(slot.lower())
        return (self, slot)


class WorkflowBuilder:
    def __init__(self, node_classes: dict, pack: tuple[str, str] = ("", ""), core_version: str = ""):
        """pack: (registry id, version) written as cnr_id/ver on EditKit nodes; core_version: ComfyUI's."""
        self.classes = node_classes
        self.pack, self.core_version = pack, core_version
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[tuple[str, list[Node], str]] = []
        self.extra: dict = {}

    def output_names(self, class_type):
        cls = self.classes[class_type]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        return list(names)

    def add(self, class_type: str, title: str | None = None, size=None, col: int | None = None,
            toy: dict | None = None, **widgets) -> Node:
        """A node; `col` pins its layout column (default: one right of its rightmost input), `toy` is its
        editkit_toy property (runner/substitute.py), `size` overrides the size estimated from its widgets."""
        if class_type not in self.classes:
            raise KeyError(f"unknown node type {class_type}")
        props = {"editkit_toy": toy} if toy else None
        node = Node(self, len(self.nodes) + 1, class_type, widgets, title, list(size) if size else None, col, props)
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str = "Note", col: int = 0, size=(340, 220)) -> Node:
        """A Markdown note on the canvas (what to change, what the workflow shows)."""
        node = Node(self, len(self.nodes) + 1, "MarkdownNote", {"text": text}, title, list(size), col, None)
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

    def group(self, title: str, members: list[Node], color="#3f789e"):
        """A titled box around consecutive nodes of one column (laid out with room for its title)."""
        self.groups.append((title, list(members), color))

    # -- building --------------------------------------------------------------------------------
    def _properties(self, n: Node) -> dict:
        if n.type in NOTE_TYPES:
            return {}
        props = {"Node name for S&R": n.type}
        module = str(getattr(self.classes[n.type], "RELATIVE_PYTHON_MODULE", ""))
        if n.type.startswith("EditKit") or module.startswith("custom_nodes"):
            if self.pack[0]:
                props.update(cnr_id=self.pack[0], ver=self.pack[1])
        elif self.core_version:
            props.update(cnr_id="comfy-core", ver=self.core_version)
        props.update(n.properties)
        return props

    def _title(self, n: Node) -> str:
        return n.title or (n.type if n.type in NOTE_TYPES else display_name(n.type, self.classes))

    def build(self) -> dict:
        titles = {}
        for n in self.nodes:
            t = self._title(n)
            if t in titles:
                raise ValueError(f"nodes {titles[t]} and {n.id} are both titled {t!r}: give one a title (titles are "
                                 "how API clients and --set find a node)")
            titles[t] = n.id
        out_nodes = []
        link_index = {l[0]: l for l in self.links}
        for order, n in enumerate(self.nodes):
            if n.type in NOTE_TYPES:
                out_nodes.append({"id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order,
                                  "mode": 0, "inputs": [], "outputs": [], "properties": {}, "title": self._title(n),
                                  "widgets_values": [n.widgets["text"]], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR})
                continue
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
            unknown = set(n.widgets) - {d.name for d in defs}
            if unknown:
                raise ValueError(f"node {n.id} ({n.type}) has no input {sorted(unknown)}")
            for i, inp in enumerate(inputs):
                if inp["link"] is not None:
                    link_index[inp["link"]][4] = i
            types = self.classes[n.type].RETURN_TYPES
            names = self.output_names(n.type)
            outputs = [{"name": names[i], "type": t, "links": n.links_out.get(i, []), "slot_index": i}
                       for i, t in enumerate(types)]
            node = {"id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order, "mode": 0,
                    "inputs": inputs, "outputs": outputs, "properties": self._properties(n),
                    "widgets_values": widgets_values}
            if n.title:
                node["title"] = n.title
            out_nodes.append(node)
        groups = layout.arrange(self, out_nodes)
        data = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": out_nodes,
                "links": self.links, "groups": groups, "config": {},
                "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}, **self.extra}, "version": 0.4}
        problems = layout.check(data)
        if problems:
            raise ValueError("layout: " + "; ".join(problems))
        return data
