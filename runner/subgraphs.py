"""Flatten the subgraphs of a UI-format workflow (front end >= 1.24: `definitions.subgraphs`).

Every instance of a subgraph (a node whose type is a subgraph id) is replaced by the subgraph's
nodes, with ids "<instance id>:<inner id>" (nested: "a:b:c"), the ids the front end's
graphToPrompt gives them. Subgraph inputs and outputs become synthetic Reroute nodes (a linked
instance input) or PrimitiveNode values (the instance's widget value for that input), which
workflow.ui_to_api already resolves. Muted instances stay muted; bypassed instances stay as one
bypassed node (their matching-type input passes through), as the front end does.
"""
from __future__ import annotations

import copy

SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MAX_DEPTH = 32


def _norm_link(link) -> list:
    if isinstance(link, dict):
        return [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type")]
    return list(link) + [None] * (6 - len(link))


def _widget_values(inst: dict, sg: dict) -> dict:
    """Subgraph input name -> the instance's widget value for it."""
    values = inst.get("widgets_values")
    if not isinstance(values, list):
        return dict(values) if isinstance(values, dict) else {}
    proxies = (inst.get("properties") or {}).get("proxyWidgets")
    if proxies:
        out = {}
        for (owner, name), v in zip(proxies, values):
            if str(owner) == "-1":
                out[name] = v
        return out
    names = [i["name"] for i in sg.get("inputs") or [] if str(i.get("type")).upper() in WIDGET_TYPES]
    return dict(zip(names, values))


def _expand(nodes: list, links: list, defs: dict, prefix: str, depth: int):
    """Flatten one graph level. Returns (nodes, links) with string ids prefixed by `prefix`."""
    if depth > MAX_DEPTH:
        raise ValueError("subgraphs nested too deeply (or recursive)")
    P = prefix
    out_nodes, out_links = [], []
    # outer link rewrites for links that leave an expanded instance: (instance id, out slot) -> synthetic node id
    out_port: dict = {}
    for node in nodes:
        nid = node["id"]
        sg = defs.get(node.get("type"))
        if sg is None or node.get("mode", 0) in (2, 4):
            n = copy.deepcopy(node)
            n["id"] = f"{P}{nid}"
            for inp in n.get("inputs") or []:
                if inp.get("link") is not None:
                    inp["link"] = f"{P}{inp['link']}"
            if sg is not None:
                n["_subgraph"] = sg.get("name") or sg["id"]
            out_nodes.append(n)
            continue
        ip = f"{P}{nid}:"
        # Subgraph inputs: a Reroute fed by the outer link into the instance, else a PrimitiveNode value.
        by_name = {i.get("name"): i for i in node.get("inputs") or []}
        values = _widget_values(node, sg)
        in_port = {}
        for k, sgi in enumerate(sg.get("inputs") or []):
            name = sgi.get("name")
            outer = by_name.get(name, {}).get("link")
            pid = f"{ip}@in{k}"
            if outer is not None:
                out_nodes.append({"id": pid, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": sgi.get("type"), "link": f"{P}{outer}"}],
                                  "outputs": [{"name": "", "type": sgi.get("type")}]})
                in_port[k] = pid
            elif name in values:
                out_nodes.append({"id": pid, "type": "PrimitiveNode", "mode": 0, "inputs": [], "outputs": [{"type": sgi.get("type")}],
                                  "widgets_values": [values[name]]})
                in_port[k] = pid
        inner_links = [_norm_link(l) for l in sg.get("links") or []]
        # Links from the subgraph's input node start at the port node; links into its output node feed an output Reroute.
        rewired, to_output = [], {}
        for l in inner_links:
            lid, o, os_, t, ts, ty = l
            if t == SUBGRAPH_OUTPUT:
                to_output[ts] = l
                continue
            if o == SUBGRAPH_INPUT:
                if os_ not in in_port:
                    continue  # unlinked, no widget value: the inner widget keeps its own value
                rewired.append([lid, "@port", os_, t, ts, ty])
                continue
            rewired.append(l)
        kept_ids = {l[0] for l in rewired}
        inner_nodes = copy.deepcopy(sg.get("nodes") or [])
        for n in inner_nodes:
            for inp in n.get("inputs") or []:
                if inp.get("link") is not None and inp["link"] not in kept_ids:
                    inp["link"] = None
        # Expand the inner level (nested instances), then re-point the port links.
        sub_nodes, sub_links = _expand(inner_nodes, [l for l in rewired if l[1] != "@port"], defs, ip, depth + 1)
        for l in rewired:
            if l[1] == "@port":
                sub_links.append([f"{ip}{l[0]}", in_port[l[2]], 0, f"{ip}{l[3]}", l[4], l[5]])
        out_nodes += sub_nodes
        out_links += sub_links
        for j, l in to_output.items():
            rid = f"{ip}@out{j}"
            o, os_ = l[1], l[2]
            if o == SUBGRAPH_INPUT:  # an input wired straight to an output
                if os_ not in in_port:
                    continue
                src, slot = in_port[os_], 0
            else:
                src, slot = f"{ip}{o}", os_
            link_id = f"{ip}{l[0]}"
            out_links.append([link_id, src, slot, rid, 0, l[5]])
            out_nodes.append({"id": rid, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": l[5], "link": link_id}],
                              "outputs": [{"name": "", "type": l[5]}]})
            out_port[(nid, j)] = rid
    for l in links:
        lid, o, os_, t, ts, ty = _norm_link(l)
        if (o, os_) in out_port:
            out_links.append([f"{P}{lid}", out_port[(o, os_)], 0, f"{P}{t}", ts, ty])
        else:
            out_links.append([f"{P}{lid}", f"{P}{o}", os_, f"{P}{t}", ts, ty])
    return out_nodes, out_links


def flatten(workflow: dict) -> dict:
    defs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    nodes, links = _expand(workflow.get("nodes") or [], workflow.get("links") or [], defs, "", 0)
    flat = {k: v for k, v in workflow.items() if k not in ("nodes", "links", "definitions")}
    flat.update(nodes=nodes, links=links)
    return flat
