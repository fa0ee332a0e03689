"""Model presets and the one model format: a diffusers ``StableDiffusionPipeline`` folder.

Presets (DiT-style registry): ``tiny`` (random, for tests), ``shapes`` (the embedded default's
sizes; as a *model name* it means the trained models shipped in ``baselines/pretrained``), and
``pretrained`` (any Stable Diffusion folder or hub id, loaded, never built).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from baselines.errors import FewstepError
from baselines.tokenizer import build_clip_tokenizer

PACKAGED = Path(__file__).parent / "pretrained"
INFO_FILE = "fewstep.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class Preset:
    """Sizes of every component of a latent diffusion model built from scratch."""

    resolution: int
    vae: dict
    clip_text: dict
    clip_vision: dict
    projection_dim: int
    unet: dict
    scheduler: dict = field(
        default_factory=lambda: dict(
            num_train_timesteps=1024,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=1,  # unused by trailing spacing; 1 silences diffusers' outdated-config warning
        )
    )


_CA, _D, _U, _CU = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        resolution=16,
        vae=dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4),
        clip_text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        clip_vision=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4
        ),
        projection_dim=16,
        unet=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=(_CA, _D),
            up_block_types=(_U, _CU),
            attention_head_dim=2,
            norm_num_groups=8,
        ),
    ),
    "shapes": Preset(
        resolution=32,
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=8, norm_num_groups=32),
        clip_text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        clip_vision=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, patch_size=4
        ),
        projection_dim=128,
        unet=dict(
            block_out_channels=(64, 96, 128),
            layers_per_block=1,
            down_block_types=(_CA, _CA, _D),
            up_block_types=(_U, _CU, _CU),
            attention_head_dim=4,
            norm_num_groups=32,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    """A preset by name, with a one-line error listing the choices."""
    if name not in PRESETS:
        raise FewstepError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} (or load a 'pretrained' folder)")
    return PRESETS[name]


def build_vae(preset: Preset) -> AutoencoderKL:
    """A randomly initialised KL autoencoder (scaling_factor is set after training, from data)."""
    n = len(preset.vae["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=preset.resolution,
        scaling_factor=1.0,
        **preset.vae,
    )


def load_vae(folder: str | os.PathLike) -> AutoencoderKL:
    """A trained ``AutoencoderKL`` folder (fp32, safetensors only); a missing or other folder is a one-line error."""
    config = Path(folder) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") != "AutoencoderKL":
        raise FewstepError(f"cannot load VAE {str(folder)!r}: its config.json is not an AutoencoderKL's")
    try:
        return AutoencoderKL.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise FewstepError(f"cannot load VAE {str(folder)!r}: {str(e).splitlines()[0]}") from None


def build_clip(preset: Preset, tokenizer: CLIPTokenizer) -> CLIPModel:
    """A randomly initialised CLIP whose text config agrees with ``tokenizer`` (ids and length).

    bos/eos/pad ids come from the tokenizer: with ``eos_token_id == 2`` transformers falls back
    to legacy argmax pooling, which is wrong for a vocabulary that does not end in the specials.
    """
    text = dict(
        preset.clip_text,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=preset.projection_dim,
    )
    vision = dict(preset.clip_vision, image_size=preset.resolution, projection_dim=preset.projection_dim)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=preset.projection_dim)
    return CLIPModel(config)


def clip_embeds(clip: CLIPModel, *, pixel_values=None, input_ids=None) -> torch.Tensor:
    """Unit-norm projected CLIP embeddings of images or of token ids."""
    if pixel_values is not None:
        return F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output), dim=-1)
    return F.normalize(clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output), dim=-1)


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The text tower of a CLIP as the ``CLIPTextModel`` a Stable Diffusion pipeline uses."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder


def build_unet(
    preset: Preset, *, latent_channels: int, cross_attention_dim: int, vae_levels: int | None = None, **overrides
) -> UNet2DConditionModel:
    """A randomly initialised conditional U-Net on the latent grid of a VAE with ``vae_levels`` levels
    (default: the preset's VAE) at the preset's resolution."""
    vae_levels = vae_levels or len(preset.vae["block_out_channels"])
    kwargs = dict(preset.unet, **overrides)
    return UNet2DConditionModel(
        sample_size=preset.resolution // 2 ** (vae_levels - 1),
        in_channels=latent_channels,
        out_channels=latent_channels,
        cross_attention_dim=cross_attention_dim,
        **kwargs,
    )


def build_scheduler(preset: Preset) -> DDIMScheduler:
    """The training scheduler: v-prediction, zero terminal SNR, trailing spacing, T = 1024."""
    return DDIMScheduler(**preset.scheduler)


def build_tokenizer() -> CLIPTokenizer:
    """The offline caption-vocabulary tokenizer (see ``baselines.tokenizer``)."""
    return build_clip_tokenizer()


def assemble_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """A stock ``StableDiffusionPipeline`` from components (no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(preset_name: str, seed: int = 0) -> StableDiffusionPipeline:
    """A complete random pipeline of a preset (the ``tiny`` one is what tests use)."""
    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    clip = build_clip(preset, tokenizer)
    vae = build_vae(preset)
    return assemble_pipeline(
        vae=vae,
        text_encoder=text_encoder_from_clip(clip),
        tokenizer=tokenizer,
        unet=build_unet(
            preset,
            latent_channels=vae.config.latent_channels,
            cross_attention_dim=clip.config.text_config.hidden_size,
        ),
        scheduler=build_scheduler(preset),
    )


def _atomic_dir(folder: Path):
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _commit_dir(tmp: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | Path, info: dict, *, half: bool = False) -> Path:
    """Write a pipeline folder (safetensors) plus ``fewstep.json``, atomically (temp, then rename).

    ``half`` stores weights as fp16 on disk (loaders upcast to fp32); used for shipped models.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(folder)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if half:
        for weights in tmp.rglob("*.safetensors"):
            _halve_safetensors(weights)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    _commit_dir(tmp, folder)
    return folder


CLIP_PIXELS_FILE = "fewstep_clip.json"  # marks fewstep's own CLIPs: pixels in [-1, 1], no mean/std


def save_clip(clip: CLIPModel, tokenizer: CLIPTokenizer, folder: str | Path, *, half: bool = False) -> Path:
    """Write a whole CLIP (vision + text) with its tokenizer and fewstep's pixel-convention marker, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(folder)
    clip.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CLIP_PIXELS_FILE).write_text(json.dumps({"pixels": [-1, 1], "image_mean": None, "image_std": None}) + "\n")
    if half:
        for weights in tmp.rglob("*.safetensors"):
            _halve_safetensors(weights)
    _commit_dir(tmp, folder)
    return folder


def _halve_safetensors(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def shipped_identity() -> str:
    """What the name ``shapes`` stands for now: a digest of the shipped models' ``MANIFEST.json`` (the hashes
    of the stages that made them), so that runs naming ``shapes`` see a change of the shipped weights."""
    manifest = PACKAGED / "MANIFEST.json"
    text = manifest.read_text() if manifest.is_file() else ""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Map a model name to a loadable location: ``shapes`` -> the shipped folder; a path as is."""
    name = str(name_or_path)
    if name == "shapes":
        folder = PACKAGED / "shapes"
        if not (folder / "model_index.json").is_file():
            raise FewstepError(
                f"the embedded 'shapes' models are not in {folder}; reinstall fewstep or rebuild them with "
                "`fewstep run configs/teacher-shapes.yaml`"
            )
        return str(folder)
    if Path(name).exists():
        folder = Path(name)
        if not (folder / "model_index.json").is_file():
            raise FewstepError(f"{folder} is not a pipeline folder: model_index.json is missing")
        return str(folder)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; loading it needs a reachable hub or a warm cache
    raise FewstepError(f"model {name!r} is neither 'shapes', a pipeline folder, nor a hub id (owner/name)")


def _check_folder(folder: Path) -> None:
    from safetensors import safe_open

    for component in COMPONENTS:
        sub = folder / component
        if not sub.is_dir():
            raise FewstepError(f"{folder} is missing its {component}/ folder")
        for weights in sub.glob("*.safetensors"):
            try:
                with safe_open(str(weights), framework="pt") as f:
                    list(f.keys())
            except Exception as e:  # safetensors raises several types for a corrupt header
                raise FewstepError(f"{weights} is corrupt or truncated ({e.__class__.__name__})") from None
        if component in ("unet", "vae", "text_encoder") and not list(sub.glob("*.safetensors")):
            raise FewstepError(f"{sub} has no .safetensors weights (fewstep reads safetensors only)")
        needs = {"tokenizer": ("vocab.json", "tokenizer.json"), "scheduler": ("scheduler_config.json",)}
        if component in needs and not any((sub / name).is_file() for name in needs[component]):
            raise FewstepError(f"{sub} has no {' or '.join(needs[component])}")


WEIGHTED = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0][:200]}" if text else e.__class__.__name__


def check_loaded(what: str, info: dict) -> None:
    """Refuse a model some of whose weights were missing from its file: the loaders would have initialised
    them at random (transformers says so only in a log), and fewstep never runs a model with random weights."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise FewstepError(
            f"{what} lacks {len(missing)} of the model's weights (e.g. {missing[0]}): a wrong or damaged weights "
            "file; fewstep never runs a model with randomly initialised weights"
        )


def _load_component(location: str, component: str):
    cls = WEIGHTED[component]
    try:
        model, info = cls.from_pretrained(
            location, subfolder=component, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except Exception as e:  # loaders raise OSError, ValueError, safetensors and meta-tensor errors for bad files
        if not Path(location).is_dir() and Path(location.split("/")[0]).is_dir():  # a mistyped local path?
            raise FewstepError(f"{location}: no such local folder, and as a hub id: {_first_line(e)}") from None
        raise FewstepError(f"cannot load {location}/{component}: {_first_line(e)}") from None
    check_loaded(f"{location}/{component}", info)
    return model


def load_pipeline(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """Load any Stable Diffusion pipeline (fp32, safetensors only, offline for local folders). The U-Net, VAE
    and text encoder are loaded one by one so that weights missing from their files are an error naming the
    file, never a silent random initialisation."""
    location = resolve_model(name_or_path)
    if Path(location).is_dir():
        _check_folder(Path(location))
    parts = {component: _load_component(location, component) for component in WEIGHTED}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            location,
            **parts,
            dtype=torch.float32,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as e:  # a missing or damaged tokenizer / scheduler file
        raise FewstepError(f"cannot load pipeline {name_or_path!r}: {_first_line(e)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_info(name_or_path: str | os.PathLike) -> dict:
    """The ``fewstep.json`` of a pipeline folder ({} for outside models that have none)."""
    location = Path(resolve_model(name_or_path))
    path = location / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewstepError(f"{path} is not valid JSON ({e.__class__.__name__}): a damaged fewstep.json") from None
    if not isinstance(info, dict):
        raise FewstepError(f"{path} must hold a JSON object, not a {type(info).__name__}")
    return info


def load_clip(name_or_path: str | os.PathLike) -> tuple[CLIPModel, CLIPTokenizer]:
    """A whole CLIP (vision + text) and its tokenizer: ``shapes`` = the shipped evaluator CLIP."""
    name = str(name_or_path)
    folder = PACKAGED / "clip" if name == "shapes" else Path(name)
    if name != "shapes" and not folder.exists() and name.count("/") != 1:
        raise FewstepError(f"CLIP {name!r} is neither 'shapes', a folder nor a hub id")
    location = str(folder) if folder.exists() else name
    try:
        clip, info = CLIPModel.from_pretrained(
            location, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
        tokenizer = CLIPTokenizer.from_pretrained(location)
    except Exception as e:  # a missing, truncated or damaged file
        raise FewstepError(f"cannot load CLIP {name!r}: {_first_line(e)}") from None
    check_loaded(f"CLIP {location}", info)
    return clip.eval(), tokenizer
