"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune the U-Net (optionally the text encoder) on a few
images of a subject bound to a rare identifier, with the class-specific prior-preservation loss
(paper eq. 2): loss = instance + prior_weight x prior, the prior term on class images the
original model generated from the class prompt. Saved as a pipeline folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from baselines import data, models
from baselines.errors import ConfigError
from baselines.guidance import UNetDenoiser, encode_tokens, is_guidance_conditioned, text_batch
from baselines.losses import denoising_loss
from baselines.samplers import generate, image_seeds, resolve_defaults
from baselines.train import TrainConfig, is_main_process, stage_device, train
from editing.common import encode_image, finetune_guidance_scale, model_resolution
from editing.concepts import ConceptSource, concept_images, concept_prompts
from editing.imagic import freeze


@dataclass
class DreamBoothStage:
    """Bind ``identifier`` to the concept images; ``bind`` names the shapes attributes the
    identifier replaces in the captions (the rest, e.g. the shape word, is the class noun)."""

    kind: str = "dreambooth"
    model: str = "shapes"
    source: ConceptSource = field(default_factory=ConceptSource)
    identifier: str = "sks"
    bind: list[str] = field(default_factory=lambda: ["colour"])
    class_noun: str = ""  # user images: prompts "<template with 'sks dog'>", class prompt "<template with 'dog'>"
    prior_weight: float = 1.0  # 0 turns prior preservation off
    num_class_images: int = 32
    class_steps: int | None = None  # default: the model's recommended steps
    class_guidance_scale: float | None = None
    train_text_encoder: bool = False
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=100, batch_size=4, lr=5e-5, checkpoint_every=10_000, log_every=10)
    )


def class_prompts(cfg: DreamBoothStage, n: int) -> list[str]:
    """The prior class's ``n`` prompts, without the identifier. User images: the template with the
    class noun. Shapes: captions of varied attributes (a fresh stream of the training
    distribution) with the concept's unbound attributes set and the bound words left out, e.g. bind
    colour on a purple triangle -> triangles of every size, background and position."""
    if cfg.source.images is not None:
        return [cfg.source.template.format(cfg.class_noun).strip()] * n
    fixed = {k: v for k, v in cfg.source.concept.items() if k not in cfg.bind}
    stream = data.ShapesDataset(split="train", seed=cfg.source.seed + 1)
    return [data.caption(a, replace=cfg.bind) for a in stream.attributes_with(fixed, n)]


def run_dreambooth(cfg: DreamBoothStage, out: Path, accelerator=None) -> Path:
    """Generate class images, fine-tune through the one loop and save ``<out>/model``."""
    if cfg.prior_weight < 0:
        raise ConfigError(f"prior_weight must be >= 0, got {cfg.prior_weight}")
    if cfg.source.images is None and (not cfg.bind or not set(cfg.bind) <= set(cfg.source.concept)):
        raise ConfigError(f"bind {list(cfg.bind)} must name attributes of the concept {dict(cfg.source.concept)}")
    concept_images(cfg.source, 8)  # bad images or concept fail before any model is loaded
    if cfg.source.images is not None and cfg.prior_weight > 0 and not cfg.class_noun.strip():
        raise ConfigError(
            "prior preservation on your own images needs a class noun for the class prompt (class_noun / --class-noun,"
            " e.g. dog), or prior_weight 0"
        )
    pipe = models.load_pipeline(cfg.model, device=stage_device(accelerator))
    info = models.read_info(cfg.model)
    images = concept_images(cfg.source, model_resolution(pipe))
    phrase = cfg.identifier if cfg.source.images is None else f"{cfg.identifier} {cfg.class_noun}".strip()
    prompts = concept_prompts(cfg.source, images, list(cfg.bind), phrase)
    latents = encode_image(pipe.vae, images.pixels)
    instance_tokens = text_batch(pipe.tokenizer, prompts)
    prior = cfg.prior_weight > 0
    if prior:
        steps, scale, sampler = resolve_defaults(
            pipe, info, steps=cfg.class_steps, guidance_scale=cfg.class_guidance_scale, sampler=None
        )  # the model's recommended sampler, with the steps recommended for it
        cprompts = class_prompts(cfg, cfg.num_class_images)
        class_pixels = generate(
            pipe,
            cprompts,
            seeds=image_seeds(cfg.train.seed, range(len(cprompts))),  # other training seeds, other class images
            sampler=sampler,
            num_inference_steps=steps,
            guidance_scale=scale,
        )
        class_latents = encode_image(pipe.vae, class_pixels * 2 - 1)
        class_tokens = text_batch(pipe.tokenizer, cprompts)
    freeze(pipe)
    pipe.unet.requires_grad_(True)
    modules = {"unet": pipe.unet}
    if cfg.train_text_encoder:
        pipe.text_encoder.requires_grad_(True)
        modules["text_encoder"] = pipe.text_encoder
    denoiser = UNetDenoiser.from_pipeline(pipe)
    # at its recommended s > 1 the loss would teach a guidance-conditioned student's guided prediction to equal
    # the conditional one: fine-tune it where it predicts the conditional model
    kwargs = {"guidance_scale": finetune_guidance_scale(info)} if is_guidance_conditioned(pipe.unet) else {}
    bs = cfg.train.batch_size

    def batches(i: int) -> dict:
        batch = {"instance": torch.arange(i * bs, (i + 1) * bs) % len(prompts)}
        if prior:
            batch["class"] = torch.arange(i * bs, (i + 1) * bs) % len(cprompts)
        return batch

    def loss(batch: dict, generator: torch.Generator) -> Tensor:
        idx = batch["instance"]
        text = encode_tokens(pipe.text_encoder, instance_tokens, idx)
        value = denoising_loss(denoiser=denoiser, x0=latents[idx], text=text, generator=generator, **kwargs)
        if prior:
            cidx = batch["class"]
            ctext = encode_tokens(pipe.text_encoder, class_tokens, cidx)
            value = value + cfg.prior_weight * denoising_loss(
                denoiser=denoiser, x0=class_latents[cidx], text=ctext, generator=generator, **kwargs
            )
        return value

    train(
        loss=loss,
        modules=modules,
        batches=batches,
        config=cfg.train,
        out_dir=out / "train",
        accelerator=accelerator,
        desc="dreambooth",
    )
    freeze(pipe)
    if is_main_process():
        model_info = {
            "method": "dreambooth",
            "parent": str(cfg.model),
            "instance_prompts": prompts,
            "class_prompts": cprompts if prior else [],
            "training_steps": cfg.train.steps,
            "recommended": info.get("recommended", {}),
            "config": asdict(cfg),
        }
        models.save_pipeline(pipe, out / "model", model_info)
    return out / "model"
