"""Stages that build the embedded teacher: train_vae, train_clip, train_teacher, load_teacher.

Each stage writes its model to ``<stage output>/model`` in a standard folder (AutoencoderKL,
CLIPModel + tokenizer, StableDiffusionPipeline + fewstep.json) and trains through the one loop.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import CLIPModel

from baselines import data, models
from baselines.errors import ConfigError, FewstepError
from baselines.guidance import UNetDenoiser, encode_text, tokenize
from baselines.losses import denoising_loss
from baselines.train import TrainConfig, barrier, is_main_process, read_log, stage_device, train


@dataclass
class TrainVAEStage:
    """Train the KL autoencoder, then measure its latent scaling factor from data."""

    kind: str = "train_vae"
    preset_parts: ClassVar[tuple[str, ...]] = ("resolution", "vae")  # sizes hashed with the config
    hashed_when_set: ClassVar[tuple[str, ...]] = ("init",)
    preset: str = "shapes"
    dataset: str = "shapes"
    init: str | None = None  # a VAE folder to continue training (its sizes, not the preset's)
    seed: int = 0
    kl_weight: float = 1e-6
    recon_loss: str = "l1"  # l1 | mse (L1 keeps edges sharper)
    scale_images: int = 2048
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=1e-3, warmup_steps=50))

    def __post_init__(self):
        if self.scale_images < 1:
            raise ConfigError(f"scale_images must be >= 1 (latents to measure the scale on), got {self.scale_images}")
        if self.recon_loss not in ("l1", "mse"):
            raise ConfigError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight must be >= 0, got {self.kl_weight}")


def check_hard_negatives(cfg) -> None:
    """A CLIP stage's hard negatives: known attributes, each once, on a dataset that has attributes."""
    unknown = set(cfg.hard_negatives) - set(data.ATTRIBUTES)
    if unknown:
        raise ConfigError(f"hard_negatives: unknown attribute {sorted(unknown)[0]!r}; choose from {data.ATTRIBUTES}")
    if len(set(cfg.hard_negatives)) != len(cfg.hard_negatives) or cfg.hard_negative_weight < 0:
        raise ConfigError(
            f"hard_negatives must name each attribute once and hard_negative_weight be >= 0, got "
            f"{list(cfg.hard_negatives)}, {cfg.hard_negative_weight}"
        )
    if cfg.hard_negatives and cfg.dataset != "shapes":
        raise ConfigError("hard_negatives need a dataset with known attributes (shapes); set hard_negatives: []")


def check_denoising_options(cfg) -> None:
    """The options a stage training a U-Net on cached latents shares: caption dropout, cache size, Min-SNR."""
    if cfg.cache_images < 1 or not 0 <= cfg.cond_dropout < 1:
        raise ConfigError(
            f"cache_images must be >= 1 and cond_dropout in [0, 1), got {cfg.cache_images}, {cfg.cond_dropout}"
        )
    if cfg.snr_gamma is not None and not cfg.snr_gamma > 0:
        raise ConfigError(f"snr_gamma must be > 0 (Min-SNR-gamma; 5 in Hang et al.) or null, got {cfg.snr_gamma}")


@dataclass
class TrainCLIPStage:
    """Train a CLIP contrastively on image-caption pairs (the teacher's text encoder and the
    embedded evaluator)."""

    kind: str = "train_clip"
    # the preset sizes this stage builds from, hashed with the config
    preset_parts: ClassVar[tuple[str, ...]] = ("resolution", "clip_text", "clip_vision", "projection_dim")
    preset: str = "shapes"
    dataset: str = "shapes"
    seed: int = 0
    hard_negatives: list[str] = field(default_factory=list)  # attributes to contrast captions on, e.g. [shape]
    hard_negative_weight: float = 1.0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1500, batch_size=128, lr=1e-3, warmup_steps=100)
    )

    def __post_init__(self):
        check_hard_negatives(self)


@dataclass
class TrainTeacherStage:
    """Train the conditional U-Net on frozen VAE latents and frozen CLIP text states, dropping the
    caption to the empty prompt with probability ``cond_dropout`` for classifier-free guidance."""

    kind: str = "train_teacher"
    preset_parts: ClassVar[tuple[str, ...]] = ("resolution", "vae", "unet", "scheduler")  # sizes hashed with the config
    preset: str = "shapes"
    dataset: str = "shapes"
    vae: str = "???"
    clip: str = "???"
    seed: int = 0
    cond_dropout: float = 0.1
    cache_images: int = 50_000
    snr_gamma: float | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=5000, batch_size=64, lr=5e-4, warmup_steps=200, lr_schedule="cosine", ema_decay=0.999
        )
    )

    def __post_init__(self):
        check_denoising_options(self)
        if self.num_inference_steps < 1 or self.guidance_scale < 1:
            raise ConfigError(
                "num_inference_steps must be >= 1 and guidance_scale >= 1 (the recommendation fewstep.json records),"
                f" got {self.num_inference_steps}, {self.guidance_scale}"
            )


@dataclass
class LoadTeacherStage:
    """Bring a teacher into the run: ``shapes`` (shipped), a pipeline folder, or a hub id."""

    kind: str = "load_teacher"
    model: str = "shapes"


def _fixed_batches(dataset, batch_size: int):
    def batches(i: int) -> dict:
        return dataset.batch(range(i * batch_size, (i + 1) * batch_size))

    return batches


def run_train_vae(cfg: TrainVAEStage, out: Path, accelerator=None) -> None:
    """Train an ``AutoencoderKL`` with an L1 or MSE reconstruction + a small KL term (Stable Diffusion's KL-f8
    recipe without the adversarial and LPIPS terms that need pretrained weights). The reconstruction is a mean
    over pixels and the KL a sum over latent elements (mean over the batch), so ``kl_weight`` counts 3 x H x W
    (the image's pixel values) times more, relative to reconstruction, than the same number in SD's recipe,
    where both terms are sums."""
    preset = models.get_preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    vae = models.build_vae(preset) if cfg.init is None else models.load_vae(cfg.init)
    dataset = data.make_dataset(cfg.dataset, resolution=preset.resolution, seed=cfg.seed)

    def loss(batch, generator):
        x = batch["pixel_values"].to(vae.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x)
        recon = vae.decode(z).sample
        distance = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
        return distance(recon, x) + cfg.kl_weight * posterior.kl().mean()

    train(
        loss=loss,
        modules={"vae": vae},
        batches=_fixed_batches(dataset, cfg.train.batch_size),
        config=cfg.train,
        out_dir=out / "train",
        accelerator=accelerator,
        desc="train_vae",
    )
    if is_main_process():
        scale = measure_scaling_factor(vae, dataset, cfg.scale_images)
        vae.register_to_config(scaling_factor=scale)
        vae.save_pretrained(out / "model", safe_serialization=True)
        metrics = {"scaling_factor": scale, "final_loss": _final_loss(out / "train")}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset, n: int, batch_size: int = 256) -> float:
    """1 / std of posterior-mean latents over ``n`` images, so scaled latents have unit variance
    (how Rombach et al. chose 0.18215 for SD's VAE; measured here, never a literal)."""
    latents = []
    for start in range(0, n, batch_size):
        x = dataset.batch(range(start, min(n, start + batch_size)))["pixel_values"].to(vae.device)
        latents.append(vae.encode(x).latent_dist.mean)
    return float(1.0 / torch.cat(latents).std())


def _final_loss(train_dir: Path) -> float | None:
    rows = read_log(train_dir)
    return rows[-1]["loss"] if rows else None


def contrastive_loss(image_embeds, text_embeds, logit_scale, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) on unit-norm embeddings, where every pair with the
    same caption counts as a positive (captions repeat within a batch on a compositional dataset)."""
    logits = logit_scale.exp() * image_embeds @ text_embeds.T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=logits.device)
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def clip_contrastive_loss(clip: CLIPModel, pixel_values, input_ids, captions: list[str]) -> torch.Tensor:
    """:func:`contrastive_loss` of a CLIP on a batch of images and their tokenised captions."""
    image = models.clip_embeds(clip, pixel_values=pixel_values)
    return contrastive_loss(image, models.clip_embeds(clip, input_ids=input_ids), clip.logit_scale, captions)


@dataclass
class FinetuneCLIPStage:
    """Continue training a CLIP contrastively, on a fresh data stream (``seed``), optionally with
    hard negatives (e.g. to sharpen an evaluator CLIP without touching the teacher's text encoder)."""

    kind: str = "finetune_clip"
    clip: str = "???"
    dataset: str = "shapes"
    seed: int = 1
    hard_negatives: list[str] = field(default_factory=list)  # attributes to contrast captions on, e.g. [shape]
    hard_negative_weight: float = 1.0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3000, batch_size=128, lr=5e-4, warmup_steps=100)
    )

    def __post_init__(self):
        check_hard_negatives(self)


def attribute_variants(attributes: list[dict], key: str) -> tuple[list[str], list[int]]:
    """Each image's caption with attribute ``key`` set to every value it can take (K per image, in
    a fixed order), and the index of the true caption among its K."""
    candidates, targets = [], []
    for a in attributes:
        values = data.attribute_values(key, a)
        candidates += [data.caption({**a, key: v}) for v in values]
        targets.append(values.index(a[key]))
    return candidates, targets


def hard_negative_loss(image_embeds, candidate_embeds, logit_scale, targets: list[int]) -> torch.Tensor:
    """NegCLIP-style hard negatives (Yuksekgonul et al. 2023): cross-entropy of each image
    (B x D) against its K candidate captions (B x K x D), the true one at ``targets``."""
    logits = logit_scale.exp() * torch.einsum("bd,bkd->bk", image_embeds, candidate_embeds)
    return F.cross_entropy(logits, torch.tensor(targets, device=logits.device))


def clip_training_loss(
    clip: CLIPModel, tokenizer, batch: dict, *, hard_negatives=(), hard_negative_weight: float = 1.0
) -> torch.Tensor:
    """The train_clip / finetune_clip loss on a batch (pixel_values, captions, attributes): InfoNCE
    plus the mean hard-negative term of each attribute in ``hard_negatives``."""
    image = models.clip_embeds(clip, pixel_values=batch["pixel_values"].to(clip.device))
    text, terms = None, []
    for key in hard_negatives:  # the true captions are among the candidates: encode each once
        candidates, targets = attribute_variants(batch["attributes"], key)
        embeds = models.clip_embeds(clip, input_ids=tokenize(tokenizer, candidates).to(clip.device))
        embeds = embeds.view(len(targets), -1, image.shape[-1])
        terms.append(hard_negative_loss(image, embeds, clip.logit_scale, targets))
        text = embeds[torch.arange(len(targets)), torch.tensor(targets)] if text is None else text
    if text is None:
        text = models.clip_embeds(clip, input_ids=tokenize(tokenizer, batch["captions"]).to(clip.device))
    value = contrastive_loss(image, text, clip.logit_scale, batch["captions"])
    return value + hard_negative_weight * sum(terms) / len(terms) if terms else value


def run_train_clip(cfg: TrainCLIPStage, out: Path, accelerator=None) -> None:
    """Build the caption tokenizer and train a CLIP on (image, caption) pairs."""
    preset = models.get_preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    tokenizer = models.build_tokenizer()
    clip = models.build_clip(preset, tokenizer)
    dataset = data.make_dataset(cfg.dataset, resolution=preset.resolution, seed=cfg.seed)
    _fit_clip(clip, tokenizer, dataset, cfg, out, accelerator, "train_clip")


def run_finetune_clip(cfg: FinetuneCLIPStage, out: Path, accelerator=None) -> None:
    """Load a CLIP and train it further on ``cfg.dataset`` (seeded stream ``cfg.seed``)."""
    clip, tokenizer = models.load_clip(cfg.clip)
    clip.requires_grad_(True)
    dataset = data.make_dataset(cfg.dataset, resolution=clip.config.vision_config.image_size, seed=cfg.seed)
    _fit_clip(clip, tokenizer, dataset, cfg, out, accelerator, "finetune_clip")


def _fit_clip(
    clip, tokenizer, dataset, cfg: TrainCLIPStage | FinetuneCLIPStage, out: Path, accelerator, desc: str
) -> None:
    """Contrastive training of ``clip`` on the one loop, plus the hard-negative terms of
    ``cfg.hard_negatives``; saves ``<out>/model``."""

    def loss(batch, generator):
        return clip_training_loss(
            clip,
            tokenizer,
            batch,
            hard_negatives=cfg.hard_negatives,
            hard_negative_weight=cfg.hard_negative_weight,
        )

    train(
        loss=loss,
        modules={"clip": clip},
        batches=_fixed_batches(dataset, cfg.train.batch_size),
        config=cfg.train,
        out_dir=out / "train",
        accelerator=accelerator,
        desc=desc,
    )
    if is_main_process():
        models.save_clip(clip, tokenizer, out / "model")


def cache_latents(vae: AutoencoderKL, dataset, n: int, cache: Path) -> dict:
    """Posterior mean/std and captions of the first ``n`` training images, cached on disk. In a
    multi-process run rank 0 encodes and writes the cache first; the others then read it."""
    if not is_main_process():
        barrier()
    result = _encode_latents(vae, dataset, n, cache)
    if is_main_process():
        barrier()
    return result


@torch.no_grad()
def _encode_latents(vae: AutoencoderKL, dataset, n: int, cache: Path, batch_size: int = 256) -> dict:
    from safetensors.torch import load_file, save_file

    tensors, captions_file = cache / "latents.safetensors", cache / "captions.json"
    if tensors.is_file() and captions_file.is_file():
        return {**load_file(tensors), "captions": json.loads(captions_file.read_text())}
    means, stds, captions = [], [], []
    for start in tqdm(range(0, n, batch_size), desc="encode latents"):
        batch = dataset.batch(range(start, min(n, start + batch_size)))
        posterior = vae.encode(batch["pixel_values"].to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        captions += batch["captions"]
    cache.mkdir(parents=True, exist_ok=True)
    result = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    # each file written whole then renamed, the captions last: a run killed mid-write re-encodes next time
    save_file(result, cache / ".latents.tmp")
    os.replace(cache / ".latents.tmp", tensors)
    (cache / ".captions.tmp").write_text(json.dumps(captions))
    os.replace(cache / ".captions.tmp", captions_file)
    return {**result, "captions": captions}


TEXT_STATE_CACHE_BYTES = 2 * 2**30


def caption_states(
    tokenizer, text_encoder, captions: list[str], max_bytes: int = TEXT_STATE_CACHE_BYTES
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``idx -> text states of captions[idx]`` for a frozen text encoder. Each distinct caption is
    encoded once up front (1680 for shapes) while their states fit in ``max_bytes``; beyond that (a
    large caption folder) every batch is encoded when it is drawn."""
    distinct = sorted(set(captions))
    per_state = tokenizer.model_max_length * text_encoder.config.hidden_size * text_encoder.dtype.itemsize
    if len(distinct) * per_state > max_bytes:
        return lambda idx: encode_text(tokenizer, text_encoder, [captions[j] for j in idx.tolist()])
    states = torch.cat(
        [encode_text(tokenizer, text_encoder, distinct[k : k + 256]) for k in range(0, len(distinct), 256)]
    )
    position = {c: k for k, c in enumerate(distinct)}
    caption_index = torch.tensor([position[c] for c in captions])
    return lambda idx: states[caption_index[idx]]


def cfg_training_loss(
    *,
    denoiser: UNetDenoiser,
    cache: dict,
    scaling_factor: float,
    tokenizer,
    text_encoder,
    batch_size: int,
    cond_dropout: float,
    snr_gamma: float | None = None,
    max_timestep: int | None = None,
) -> tuple[Callable[[int], dict], Callable[[dict, torch.Generator], torch.Tensor]]:
    """``(batches, loss)`` for the one training loop: the denoising loss on cached posterior latents
    (a fresh posterior sample each time, times ``scaling_factor``) and frozen text states, the caption
    dropped to the empty prompt with probability ``cond_dropout`` for classifier-free guidance."""
    null_text = encode_text(tokenizer, text_encoder, [""])
    n = len(cache["captions"])
    text_states = caption_states(tokenizer, text_encoder, cache["captions"])

    def batches(i: int) -> dict:
        idx = torch.arange(i * batch_size, (i + 1) * batch_size) % n
        return {"mean": cache["mean"][idx], "std": cache["std"][idx], "text": text_states(idx)}

    def loss(batch: dict, generator: torch.Generator) -> torch.Tensor:
        mean, std = batch["mean"], batch["std"]
        x0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
        drop = torch.rand(x0.shape[0], generator=generator) < cond_dropout
        text = batch["text"]
        text = torch.where(drop[:, None, None].to(text.device), null_text.to(text).expand_as(text), text)
        device = next(denoiser.parameters()).device
        return denoising_loss(
            denoiser=denoiser,
            x0=x0.to(device),
            text=text.to(device),
            generator=generator,
            snr_gamma=snr_gamma,
            max_timestep=max_timestep,
        )

    return batches, loss


def run_train_teacher(cfg: TrainTeacherStage, out: Path, accelerator=None) -> None:
    """Train the CFG U-Net teacher and save it as a complete StableDiffusionPipeline folder."""
    if not 0 <= cfg.cond_dropout < 1:
        raise ConfigError(f"cond_dropout must be in [0, 1), got {cfg.cond_dropout}")
    preset = models.get_preset(cfg.preset)
    device = stage_device(accelerator)  # the frozen VAE and text encoder encode the cache there (train moves the U-Net)
    vae = models.load_vae(cfg.vae).to(device).eval().requires_grad_(False)
    clip, tokenizer = models.load_clip(cfg.clip)
    text_encoder = models.text_encoder_from_clip(clip).to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet = models.build_unet(
        preset,
        latent_channels=vae.config.latent_channels,
        cross_attention_dim=text_encoder.config.hidden_size,
        vae_levels=len(vae.config.block_out_channels),  # the VAE it trains on, which may not be the preset's
    )
    scheduler = models.build_scheduler(preset)
    denoiser = UNetDenoiser(unet, dict(scheduler.config), scheduler.alphas_cumprod)
    dataset = data.make_dataset(cfg.dataset, resolution=preset.resolution, seed=cfg.seed)
    cache = cache_latents(vae, dataset, cfg.cache_images, out / "cache")
    batches, loss = cfg_training_loss(
        denoiser=denoiser,
        cache=cache,
        scaling_factor=vae.config.scaling_factor,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        batch_size=cfg.train.batch_size,
        cond_dropout=cfg.cond_dropout,
        snr_gamma=cfg.snr_gamma,
    )

    train(
        loss=loss,
        modules={"unet": unet},
        batches=batches,
        config=cfg.train,
        out_dir=out / "train",
        accelerator=accelerator,
        desc="train_teacher",
    )
    if is_main_process():
        pipe = models.assemble_pipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        info = {
            "method": "teacher",
            "parent": {"vae": str(cfg.vae), "clip": str(cfg.clip)},
            "training_steps": cfg.train.steps,
            "final_loss": _final_loss(out / "train"),
            "recommended": {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale},
            "config": asdict(cfg),
        }
        models.save_pipeline(pipe, out / "model", info)


def run_load_teacher(cfg: LoadTeacherStage, out: Path, accelerator=None) -> None:
    """Copy (local) or download-and-save (hub id) a teacher pipeline into ``<out>/model``."""
    location = Path(models.resolve_model(cfg.model))
    if location.is_dir():
        models.load_pipeline(location)  # validates every component before copying
        target = out / "model"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(location, target)
        return
    try:
        pipe = models.load_pipeline(cfg.model)
    except Exception as e:  # hub errors come in many types; the message says what happened
        raise FewstepError(f"cannot load teacher {cfg.model!r}: {str(e).splitlines()[0]}") from None
    models.save_pipeline(pipe, out / "model", {"method": "pretrained", "parent": cfg.model})
