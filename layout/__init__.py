"""Layout and composition: regions (masks or boxes with their prompts), regional attention, MultiDiffusion."""
