"""Headless tooling: booting ComfyUI in-process, UI->API workflow conversion, running workflows. No node classes."""
