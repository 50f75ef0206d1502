"""Attention-side algorithms (capture, control, injection) over ComfyUI's attention hooks. No node classes."""
