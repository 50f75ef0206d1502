"""Sampler-side algorithms (noising, inversion, custom sampling loops) as plain functions. No node classes."""
