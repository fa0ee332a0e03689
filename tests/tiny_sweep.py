"""Tiny models and a tiny sweep grid, shared by test_sweep (in process) and test_distributed (under torchrun)."""

from __future__ import annotations

from pathlib import Path

import torch

from baselines import models


def save_tiny_models(root: Path) -> Path:
    """A tiny CFG teacher, a tiny guidance-conditioned student (time_cond_proj_dim) and a tiny CLIP under ``root``."""
    teacher = models.build_pipeline("tiny", seed=0)
    models.save_pipeline(teacher, root / "teacher", {"method": "teacher", "recommended": {"guidance_scale": 2.0}})
    student = models.build_pipeline("tiny", seed=1)
    preset = models.get_preset("tiny")
    torch.manual_seed(1)
    student.unet = models.build_unet(preset, latent_channels=4, cross_attention_dim=16, time_cond_proj_dim=8)
    info = {"method": "guidance", "steps": 2, "recommended": {"num_inference_steps": 2, "guidance_scale": 2.0}}
    models.save_pipeline(student, root / "student", info)
    torch.manual_seed(2)
    tok = models.build_tokenizer()
    models.save_clip(models.build_clip(preset, tok), tok, root / "clip")
    return root


def sweep_fields(root: Path, run: Path) -> dict:
    """The fields of a sweep stage over the two tiny models: six cells of six images."""
    return dict(
        models=[
            {"name": "teacher", "path": str(root / "teacher"), "guidance_scales": [1.5, 3.0]},
            {"name": "student", "path": str(root / "student"), "steps": [1, 2]},
        ],
        steps=[1, 2],
        guidance_scales=[2.0],
        n_images=6,
        reference_images=24,
        extractors=[f"clip:{root / 'clip'}"],
        clip=str(root / "clip"),
        bootstrap=5,
        batch_size=6,
        grid_images=4,
        cache_dir=str(run / "cache"),
    )
