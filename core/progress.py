"""Progress of EditKit's own sampling loops (inversion, null-text optimisation): ComfyUI's progress bar
with its latent previews, as KSampler shows them (the preview method is the user's --preview-method)."""
from __future__ import annotations


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (/interrupt): every EditKit
    loop calls this per model evaluation (BranchGuider.predict, gradients.Env.denoise, StepProgress)."""
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


class StepProgress:
    def __init__(self, model, total: int):
        import comfy.utils
        self.total, self.done = max(int(total), 1), 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = None
        if model is not None and hasattr(model, "load_device"):
            import latent_preview
            self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def update(self, n: int = 1, x0=None) -> None:
        """Advance by n; x0 (the current clean-latent estimate, sampler space) becomes the preview."""
        check_interrupt()
        self.show(self.done + n, x0)

    def show(self, done: int, x0=None) -> None:
        """Set the bar to `done` (no interrupt check: loops that checkpoint on interrupt check themselves);
        x0 (sampler space) becomes the preview image when given."""
        self.done = min(int(done), self.total)
        preview = None
        if self.previewer is not None and x0 is not None and not getattr(x0, "is_nested", False):
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0.float())
        self.bar.update_absolute(self.done, self.total, preview)
