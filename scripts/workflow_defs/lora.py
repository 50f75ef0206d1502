"""Workflows of the LoRA nodes (`--model toy` swaps in the LoRA files lora/demo_assets.py generates)."""
from .common import SOURCE_PROMPT, builder, checkpoint, decode_and_save, empty_latent, note, text

STYLE = "style_lora.safetensors"
DETAIL = "detail_lora.safetensors"


def lora_merge(family="sd15"):
    b = builder()
    note(b, family, "Merge two LoRAs (TIES), save the merge, apply it with block weights",
         ["**LoRA Merge**: pick two LoRAs made for your checkpoint (models/loras/) and their weights.",
          "**LoRA Block Weight**: the strength per block (here the input blocks at 0.5, OUT00-OUT01 off).",
          "**LoRA Save** shows where the merged file went; LoRA Merge shows its statistics."],
         "TIES at density 0.5, rank 8 (Yadav et al. 2023); 30 steps, CFG 7.5.")
    ld = checkpoint(b, family)
    merge = b.add("EditKitLoraMerge", title="Merge two LoRAs (TIES)", method="ties",
                  lora_1=STYLE, weight_1=1.0, lora_2=DETAIL, weight_2=0.8, lora_3="None", weight_3=1.0,
                  lora_4="None", weight_4=1.0, rank=8, density=0.5, drop_rate=0.5, seed=0, dtype="fp16", exact_svd=False,
                  weight_a=1.0, weight_b=1.0)
    b.connect(ld.out("model"), merge, "model")
    b.connect(ld.out("clip"), merge, "clip")
    save_lora = b.add("EditKitLoraSave", filename_prefix="editkit_merged")
    b.connect(merge.out(0), save_lora, "lora")
    bw = b.add("EditKitLoraBlockWeight", title="Apply with block weights", lora_name="None",
               strength_model=1.0, strength_clip=1.0, preset="custom",
               block_weights="BASE=1, IN=0.5, MID=1, OUT=1, OUT00-OUT01=0")
    b.connect(ld.out("model"), bw, "model")
    b.connect(ld.out("clip"), bw, "clip")
    b.connect(merge.out(0), bw, "lora")
    pos = text(b, bw.out(1), SOURCE_PROMPT, "Positive prompt")
    neg = text(b, bw.out(1), "", "Negative prompt")
    empty = empty_latent(b, family)
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(bw.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_lora_merge")
    return b.build()


WORKFLOWS = {"lora_merge": ("LoRA - Merge and block weights", lora_merge)}
