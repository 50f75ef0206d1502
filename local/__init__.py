"""Local editing: automatic masks (DiffEdit), masks at latent resolution, masked decoding (blended latents)."""
