"""Thin V3 nodes, one file per area. Each node validates, clones the model, installs patches, returns."""


def node_list() -> list:
    from . import adapters, analysis, editing, guidance, loaders
    nodes = []
    for module in (loaders, editing, analysis, guidance, adapters):
        nodes.extend(module.NODES)
    return nodes
