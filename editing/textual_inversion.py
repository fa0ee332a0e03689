"""Textual inversion (Gal et al., ICLR 2023): learn new token embeddings from a few images of a
concept, every weight frozen. Only the new rows of the embedding matrix change: they are held as
their own parameter and spliced after the frozen rows. The result is ``learned_embeds.safetensors``
in the diffusers format that stock ``pipe.load_textual_inversion(path)`` loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from baselines import models
from baselines.errors import ConfigError
from baselines.guidance import UNetDenoiser, encode_tokens, is_guidance_conditioned, text_batch
from baselines.losses import denoising_loss
from baselines.train import TrainConfig, is_main_process, stage_device, train
from editing.common import encode_image, finetune_guidance_scale, model_resolution
from editing.concepts import ConceptSource, concept_images, concept_prompts
from editing.imagic import freeze

EMBEDS_FILE = "learned_embeds.safetensors"


class NewTokenRows(nn.Module):
    """An embedding whose rows from ``first_new`` on are a trainable parameter and the rest frozen."""

    def __init__(self, embedding: nn.Embedding, first_new: int):
        super().__init__()
        self.frozen = embedding.requires_grad_(False)
        self.first_new = first_new
        self.rows = nn.Parameter(embedding.weight[first_new:].detach().clone())

    def forward(self, input_ids: Tensor) -> Tensor:
        weight = torch.cat([self.frozen.weight[: self.first_new], self.rows])
        return F.embedding(input_ids, weight)


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The token strings of a (multi-vector) placeholder, named as diffusers' loader names them."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_placeholder(tokenizer, text_encoder, placeholder: str, num_vectors: int, initializer: str) -> list[int]:
    """Add the placeholder tokens, grow the embedding matrix and initialise the new rows from the
    mean embedding of ``initializer``'s tokens; returns the new ids."""
    if num_vectors < 1:
        raise ConfigError(f"num_vectors must be >= 1, got {num_vectors}")
    tokens = placeholder_tokens(placeholder, num_vectors)
    if any(t in tokenizer.get_vocab() for t in tokens):
        raise ConfigError(f"placeholder {placeholder!r} is already a token: choose another, e.g. '<my-concept>'")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise ConfigError(f"initializer {initializer!r} has no tokens")
    tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids].mean(0)
    return ids


@dataclass
class TextualInversionStage:
    """Learn ``placeholder`` (``num_vectors`` rows) from a few concept images."""

    kind: str = "textual_inversion"
    model: str = "shapes"
    source: ConceptSource = field(default_factory=ConceptSource)
    placeholder: str = "<concept>"
    num_vectors: int = 2  # measured on shapes: 1 vector did not capture colour + shape, 2 did
    initializer: str = "shape"
    guidance_scale: float | None = None  # only for a guidance-conditioned student
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=600, batch_size=8, lr=2e-2, checkpoint_every=10_000, log_every=50)
    )


def learn_embeddings(pipe, cfg: TextualInversionStage, out_dir: Path, accelerator=None) -> dict[str, Tensor]:
    """Train the placeholder rows through the one loop; returns {placeholder: (num_vectors, D)} and
    leaves the learned rows in ``pipe.text_encoder``."""
    images = concept_images(cfg.source, model_resolution(pipe))
    phrase = " ".join(placeholder_tokens(cfg.placeholder, cfg.num_vectors))
    prompts = concept_prompts(cfg.source, images, list(cfg.source.concept), phrase)
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, cfg.placeholder, cfg.num_vectors, cfg.initializer)
    first = min(ids)
    if ids != list(range(first, first + len(ids))) or first + len(ids) != len(pipe.tokenizer):
        raise ConfigError("placeholder ids are not the last rows of the embedding matrix")
    latents = encode_image(pipe.vae, images.pixels)
    tokens = text_batch(pipe.tokenizer, prompts)
    freeze(pipe)
    original = pipe.text_encoder.get_input_embeddings()
    rows = NewTokenRows(original, first)
    pipe.text_encoder.set_input_embeddings(rows)
    denoiser = UNetDenoiser.from_pipeline(pipe)
    conditioned = is_guidance_conditioned(pipe.unet)
    if cfg.guidance_scale is not None and not conditioned:
        raise ConfigError(f"guidance_scale is for a guidance-conditioned student; {cfg.model} takes no scale")
    kwargs = (
        {
            "guidance_scale": finetune_guidance_scale(models.read_info(cfg.model))
            if cfg.guidance_scale is None
            else cfg.guidance_scale
        }
        if conditioned
        else {}
    )
    n, bs = len(prompts), cfg.train.batch_size

    def batches(i: int) -> dict:
        idx = torch.arange(i * bs, (i + 1) * bs) % n
        return {"latents": latents[idx], "rows": idx}

    def loss(batch: dict, generator: torch.Generator) -> Tensor:
        text = encode_tokens(pipe.text_encoder, tokens, batch["rows"])
        return denoising_loss(denoiser=denoiser, x0=batch["latents"], text=text, generator=generator, **kwargs)

    try:
        train(
            loss=loss,
            modules={"tokens": rows},
            batches=batches,
            config=cfg.train,
            out_dir=out_dir,
            accelerator=accelerator,
            desc="textual inversion",
        )
    finally:
        pipe.text_encoder.set_input_embeddings(original)
    with torch.no_grad():
        original.weight[first:] = rows.rows.detach()
    return {cfg.placeholder: rows.rows.detach().clone().contiguous()}


def run_textual_inversion(cfg: TextualInversionStage, out: Path, accelerator=None) -> dict[str, Tensor]:
    """Learn the embeddings and write ``<out>/learned_embeds.safetensors`` plus ``<out>/info.json``."""
    concept_images(cfg.source, 8)  # bad images or concept fail before any model is loaded
    pipe = models.load_pipeline(cfg.model, device=stage_device(accelerator))
    learned = learn_embeddings(pipe, cfg, out / "train", accelerator=accelerator)
    if is_main_process():
        save_file(learned, out / EMBEDS_FILE)
        info = {"method": "textual_inversion", "parent": str(cfg.model), "config": asdict(cfg)}
        (out / "info.json").write_text(json.dumps(info, indent=2))
    return learned
