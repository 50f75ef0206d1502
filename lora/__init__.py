"""LoRA merging and per-block application, on ComfyUI's own weight keys (no node classes here).

  st_io        safetensors read (lazy, one tensor at a time) and streaming write
  formats      LoRA key layouts -> exact low-rank factors / dense deltas per ComfyUI weight key
  merge        merge methods (concat, SVD re-rank, TIES, DARE, DARE-TIES, magnitude prune), streaming
  blocks       block layout from the model, block-weight syntax and presets, per-block application
  stats        the merge-statistics image
  synthetic    deterministic random LoRAs in every supported format (demo files, tests, benchmarks)
  layouts      full-size SD1.5 / SDXL layouts on the meta device (keys and shapes without weights)
  demo_assets  the LoRA files the shipped workflows name (runner/assets.py contract)
"""
