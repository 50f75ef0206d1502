"""Thin V3 nodes, one file per area. Each node validates, clones the model, installs patches, returns."""


def node_list() -> list:
    from . import adapters, analysis, attention_control, cache, editing, guidance, inversion, loaders, lora, toy
    nodes = []
    for module in (loaders, editing, analysis, guidance, adapters, toy, inversion, attention_control, lora, cache):
        nodes.extend(module.NODES)
    return nodes
