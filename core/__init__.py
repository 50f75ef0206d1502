"""Shared core of EditKit: model introspection, the denoiser toolkit and patch composition.

Library code only (no node classes). Everything here works on ComfyUI's public objects
(ModelPatcher, model_sampling, transformer_options) and plain torch tensors.
"""
