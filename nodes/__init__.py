"""Thin V3 nodes, one file per area. Each node validates, clones the model, installs patches, returns."""


def node_list() -> list:
    from . import adapters, analysis, attention_control, editing, guidance, inversion, loaders, lora, toy, training
    nodes = []
    for module in (loaders, editing, analysis, guidance, adapters, toy, inversion, attention_control, lora, training):
        nodes.extend(module.NODES)
    return nodes
