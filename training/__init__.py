"""Training core (one owner of the training loop): the diffusion objective from the model's own
model_sampling (EPS, v-prediction and flow alike), seeded batches, AdamW with gradient accumulation on
fp32 master parameters, EMA, progress with the loss, interrupt -> checkpoint, resume; trainable LoRA in
ComfyUI's own weight-adapter format; output paths kept inside their ComfyUI folder.

Gradients flow through a gradient clone of the user's model (core/gradients.py); the user's model and
its weights are never touched."""
