"""Guidance composer: schedules, guidance terms, the composing GUIDER, CFG++ samplers and the
CFG-schedule MODEL patch. Library code only (no node classes); the nodes are in nodes/guidance.py.
"""
