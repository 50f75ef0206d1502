"""Image-prompt and structure adapters: IP-Adapter (decoupled cross-attention) and ControlNet /
T2I-Adapter control schedules. Plain functions and small classes; the nodes live in nodes/adapters.py.
"""
