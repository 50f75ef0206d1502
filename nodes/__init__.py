"""Thin V3 nodes, one file per area. Each node validates, clones the model, installs patches, returns."""


def node_list() -> list:
    from . import adapters, analysis, attention_control, editing, guidance, inversion, layout, loaders, lora, toy
    nodes = []
    for module in (loaders, editing, analysis, guidance, adapters, toy, inversion, attention_control, lora, layout):
        nodes.extend(module.NODES)
    return nodes
