"""Canvas layout of UI-format workflows: node sizes, automatic placement, and the hygiene check.

A node's box on the canvas is its body (pos, size) plus the title bar above it (TITLE_H). Nodes that
show an image after a run (Save/Preview Image, Load Image, EditKit nodes whose class lists "image" in
EDITKIT_SHOWS) are sized with room for it, nodes that show text ("text") with room for the text box,
nodes with an editor on the node ("editor") with room for it,
so the layout stays clean once a run has filled them in. check() is what tests/test_workflows.py and
the browser test assert: no two node boxes overlap and no node covers a group's title.
"""
from __future__ import annotations

TITLE_H = 30            # LiteGraph.NODE_TITLE_HEIGHT
SLOT_H = 20             # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_H = 24           # NODE_WIDGET_HEIGHT + 4
MULTILINE_H = 96        # a multiline text box
LINKED_MULTILINE_H = 54
IMAGE_H = 270           # room for an image preview
TEXT_H = 96             # room for EditKit's read-only text box
EDITOR_H = 300          # room for an editor drawn on the node (the drag point editor: web/editkit_drag.js)
GROUP_HEAD = 50         # a group's title band (font 24) and margin, above its first node's title bar
GROUP_PAD = 15
COL_GAP, ROW_GAP = 70, 40
X0, Y0 = 20, 60
WIDTH = 320
IMAGE_NODES = {"SaveImage": 340, "PreviewImage": 340, "LoadImage": 320}


def shows(node_type: str, classes: dict) -> tuple:
    cls = classes.get(node_type)
    if node_type in IMAGE_NODES:
        return ("image",)
    return tuple(getattr(cls, "EDITKIT_SHOWS", ()) or ())


def estimate_size(node: dict, classes: dict) -> list[int]:
    """Width and body height the canvas needs for a node of the builder (widgets from its definition)."""
    from .workflow import node_inputs
    ntype = node["type"]
    defs = node_inputs(ntype, classes)
    linked_widgets = {i["name"] for i in node.get("inputs") or [] if i.get("widget")}
    slots = max(len([i for i in node.get("inputs") or [] if not i.get("widget")]), len(node.get("outputs") or []), 1)
    h = slots * SLOT_H + 14
    for d in defs:
        if not d.is_widget:
            continue
        if d.name in linked_widgets:     # a linked widget keeps its row (front end 1.32.9: 54 px for a text box)
            h += LINKED_MULTILINE_H if d.type == "STRING" and d.options.get("multiline") else WIDGET_H
            continue
        h += MULTILINE_H if d.type == "STRING" and d.options.get("multiline") else WIDGET_H
        if d.has_control:
            h += WIDGET_H
        if d.options.get("image_upload"):
            h += WIDGET_H
    what = shows(ntype, classes)
    if "image" in what:
        h += IMAGE_H
    if "text" in what:
        h += TEXT_H
    if "editor" in what:
        h += EDITOR_H
    title = node.get("title") or ""
    w = max(IMAGE_NODES.get(ntype, WIDTH), 9 * len(title) + 60)
    return [int(w), int(h)]


def _columns(builder) -> dict:
    """Column of each node: pinned (col=), else one right of its rightmost input; a node without inputs
    sits just left of its first consumer."""
    col = {}
    sources = {n.id: [] for n in builder.nodes}
    consumers = {n.id: [] for n in builder.nodes}
    for link in builder.links:
        sources[link[3]].append(link[1])
        consumers[link[1]].append(link[3])
    for _ in range(2 * len(builder.nodes) + 2):
        changed = False
        for n in builder.nodes:
            if n.col is not None:
                c = n.col
            elif sources[n.id]:
                c = 1 + max(col.get(s, 0) for s in sources[n.id])
            else:
                c = min((col.get(t, 1) for t in consumers[n.id]), default=1) - 1
            c = max(c, 0)
            if col.get(n.id) != c:
                col[n.id], changed = c, True
        if not changed:
            break
    return col


def arrange(builder, out_nodes: list[dict]) -> list[dict]:
    """Place every node (columns by data flow, stacked in the order they were added) and return the groups."""
    by_id = {d["id"]: d for d in out_nodes}
    for n in builder.nodes:
        d = by_id[n.id]
        d["size"] = list(n.size) if n.size else estimate_size(d, builder.classes)
    col = _columns(builder)
    first_of_group, last_of_group = {}, {}
    for title, members, color in builder.groups:
        cols = {col[m.id] for m in members}
        if len(cols) != 1:
            raise ValueError(f"group {title!r}: its nodes must share a column (pin them with col=)")
        first_of_group[members[0].id] = title
        last_of_group[members[-1].id] = title
    widths = {}
    for n in builder.nodes:
        widths[col[n.id]] = max(widths.get(col[n.id], 0), by_id[n.id]["size"][0])
    xs, x = {}, X0
    for c in range(max(widths) + 1 if widths else 0):
        xs[c] = x
        x += widths.get(c, 0) + COL_GAP
    ys = {}
    for n in builder.nodes:
        c = col[n.id]
        y = ys.get(c, Y0)
        if n.id in first_of_group:
            y += GROUP_HEAD
        by_id[n.id]["pos"] = [xs[c], y]
        ys[c] = y + by_id[n.id]["size"][1] + TITLE_H + ROW_GAP + (GROUP_PAD if n.id in last_of_group else 0)
    groups = []
    for title, members, color in builder.groups:
        boxes = [box(by_id[m.id]) for m in members]
        x0, y0 = min(b[0] for b in boxes) - GROUP_PAD, min(b[1] for b in boxes) - GROUP_HEAD + 5
        x1, y1 = max(b[2] for b in boxes) + GROUP_PAD, max(b[3] for b in boxes) + GROUP_PAD
        groups.append({"title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color, "font_size": 24,
                       "flags": {}})
    return groups


def box(node: dict) -> tuple:
    """(x0, y0, x1, y1) of a node on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    if (node.get("flags") or {}).get("collapsed"):
        return (x, y - TITLE_H, x + min(w, 200), y)
    return (x, y - TITLE_H, x + w, y + h)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check(data: dict) -> list[str]:
    """Layout problems of a UI-format workflow (empty when clean): overlapping nodes, covered group titles."""
    def pos_size(n):
        p, s = n.get("pos"), n.get("size")
        if isinstance(p, dict):
            p = [p.get("0", 0), p.get("1", 0)]
        if isinstance(s, dict):
            s = [s.get("0", 0), s.get("1", 0)]
        return dict(n, pos=list(p), size=list(s))
    nodes = [pos_size(n) for n in data.get("nodes") or []]
    problems = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if _overlap(box(a), box(b)):
                problems.append(f"nodes {a['id']} ({a['type']}) and {b['id']} ({b['type']}) overlap")
    for g in data.get("groups") or []:
        x, y, w, h = g["bounding"]
        band = (x, y, x + w, y + (g.get("font_size") or 24) * 1.4 + 4)
        for n in nodes:
            if _overlap(box(n), band):
                problems.append(f"node {n['id']} ({n['type']}) covers the title of group {g['title']!r}")
    return problems
