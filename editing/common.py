"""What every editing method shares: inputs (user image or held-out shapes image), VAE encoding,
the one partial-trajectory DDIM sampling loop, and the ``edits.jsonl`` output rows.

Pixel convention: images are (B,3,H,W) in [-1, 1]; latents are scaled by the VAE's
``scaling_factor`` (read from its config, never a literal).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm.auto import tqdm

from baselines import data, diffusion
from baselines.errors import ConfigError, FewstepError
from baselines.samplers import ddim_step_with, make_scheduler

IMAGE_HELP = (
    "Any PIL-readable image: greyscale is replicated to RGB, alpha is composited over black, and the "
    "shorter side is resized (bicubic) to the model's resolution, then centre-cropped."
)


@dataclass
class EditSource:
    """The images an edit stage works on: one user image with a prompt, or held-out shapes images
    with an attribute change (the caption and the target attributes are then derived)."""

    image: str | None = None
    prompt: str | None = None
    source_prompt: str | None = None
    change: dict[str, str] = field(default_factory=dict)  # e.g. {colour: green}; required for shapes inputs
    num_inputs: int = 1
    first_index: int = 0
    seed: int = 0


@dataclass
class EditInput:
    """One image to edit with its target text (and attributes when it is a shapes image)."""

    name: str
    pixels: Tensor  # (3,H,W) in [-1, 1]
    prompt: str
    source_prompt: str | None = None
    input_attributes: dict | None = None
    target_attributes: dict | None = None
    geometry: dict | None = None  # continuous shape geometry (cx, cy, r as fractions of the side)


def model_resolution(pipe) -> int:
    """Pixel side of the model's images: latent sample size x VAE down-sampling factor."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _valid_change(attrs: dict, change: dict) -> bool:
    target = {**attrs, **change}
    if all(attrs[k] == v for k, v in change.items()):
        return False
    return target["colour"] != target["background"]


def preflight(source: EditSource, mask: str | None = None) -> None:
    """Check a user image (and mask) before any model is loaded, so bad input fails fast."""
    if source.image is not None:
        data.load_image(source.image, 8)
        if not source.prompt:
            raise ConfigError("an edit of a user image needs a prompt (the target text)")
    if mask is not None:
        load_mask(mask, source.image, 8)


def resolve_inputs(source: EditSource, resolution: int) -> list[EditInput]:
    """The edit inputs of a stage or CLI call; one-line ``FewstepError`` on bad input."""
    if source.image is not None:
        if not source.prompt:
            raise ConfigError("an edit of a user image needs a prompt (the target text)")
        pixels = data.load_image(source.image, resolution)
        return [EditInput(Path(source.image).stem, pixels, source.prompt, source.source_prompt)]
    bad = sorted(set(source.change) - set(data.ATTRIBUTES))
    if bad or not source.change:
        raise ConfigError(
            f"change must set one or more shapes attributes {list(data.ATTRIBUTES)} (e.g. colour: green), "
            f"got {dict(source.change)}"
        )
    for key, value in source.change.items():
        if value not in data.attribute_values(key):
            raise ConfigError(f"change.{key}: {value!r} is not one of {data.attribute_values(key)}")
    if source.num_inputs < 1:
        raise ConfigError(f"num_inputs must be >= 1, got {source.num_inputs}")
    ds = data.ShapesDataset(split="heldout", resolution=resolution, seed=source.seed)
    inputs, index = [], source.first_index
    while len(inputs) < source.num_inputs:
        if index >= len(ds):
            raise ConfigError(f"not enough held-out images where {dict(source.change)} is a valid change")
        image, attrs = ds.sample(index)
        named = {k: attrs[k] for k in data.ATTRIBUTES}
        if _valid_change(named, source.change):
            target = {**named, **source.change}
            geometry = {k: attrs[k] for k in ("cx", "cy", "r")}
            inputs.append(
                EditInput(
                    f"heldout{index:05d}",
                    data.to_tensor(image),
                    data.caption(target),
                    data.caption(named),
                    named,
                    target,
                    geometry,
                )
            )
        index += 1
    return inputs


@torch.no_grad()
def encode_image(vae, pixels: Tensor) -> Tensor:
    """Scaled VAE latents (posterior mean x ``scaling_factor``) of (B,3,H,W) images in [-1, 1]."""
    device = next(vae.parameters()).device
    return vae.encode(pixels.to(device)).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: Tensor) -> Tensor:
    """Images in [-1, 1] from scaled latents."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def timestep_grid(scheduler_config: dict, steps: int) -> Tensor:
    """The sampler's time grid (descending) for ``steps`` steps, from the pipeline's scheduler
    config (trailing spacing for fewstep models, so grids nest)."""
    if steps < 1:
        raise FewstepError(f"steps must be >= 1, got {steps}")
    scheduler = make_scheduler("ddim", scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.clone().long()


def start_index(steps: int, strength: float) -> int:
    """First grid index for an edit of ``strength`` (as diffusers' img2img: ``int(steps * strength)``
    steps are run, the last ones of the grid)."""
    if not 0.0 <= strength <= 1.0:
        raise FewstepError(f"strength must be in [0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)


def check_strengths(strengths: list[float], steps: int) -> None:
    """Each strength in [0, 1] runs at least one of the ``steps`` grid steps (strength 0, the VAE round trip,
    runs none), as diffusers' img2img requires; warns when strengths run the same steps (identical edits)."""
    runs: dict[int, list[float]] = {}
    for strength in strengths:
        run = steps - start_index(steps, strength)
        if strength > 0 and run == 0:
            raise ConfigError(
                f"strength {strength:g} runs no step of {steps} (int({steps} x {strength:g}) = 0): "
                "raise the strength or the steps"
            )
        runs.setdefault(run, []).append(strength)
    for run, same in runs.items():
        if len(same) > 1:
            warnings.warn(
                f"strengths {', '.join(f'{s:g}' for s in same)} all run {run} of {steps} steps: their edits are the "
                "same",
                stacklevel=2,
            )


def check_seeds(seeds: list[int], n: int) -> None:
    """One seed per image: a batch of ``n`` images needs ``n`` seeds."""
    if len(seeds) != n:
        raise FewstepError(f"{n} image(s) but {len(seeds)} seed(s): give one seed per image")


def draw_noise(shape: tuple, seeds: list[int]) -> Tensor:
    """Standard normal noise with one generator per sample (sample i is the same at any batch size)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


StepCallback = Callable[[Tensor, Tensor], Tensor]  # (z at the new time, new timestep) -> z


@torch.no_grad()
def ddim_partial(
    denoiser,
    *,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: float,
    x0: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    start: int,
    text: Tensor,
    callback: StepCallback | None = None,
    progress: bool = False,
    pure_noise: bool = False,
    **denoiser_kwargs,
) -> Tensor:
    """The one editing sampler: noise ``x0`` to grid point ``timesteps[start]`` (SDEdit, Meng et al.
    2022), then deterministic DDIM steps (Song et al. 2021, eq. 12) along the rest of the grid.
    ``callback(z, t_prev)`` may rewrite the latent after each step (inpainting). ``start ==
    len(timesteps)`` runs no step and returns ``x0``. At ``start == 0`` with ``pure_noise``, z begins as the
    noise itself, as diffusers' text-to-image and inpainting (at full strength) pipelines begin (DDIM's
    ``init_noise_sigma`` is 1); without it, as its img2img does, from alpha_T x0 + sigma_T eps, which keeps a
    trace of x0 unless the schedule has zero terminal SNR (there the two are the same)."""
    if start >= len(timesteps):
        return x0
    acp = alphas_cumprod
    if start == 0 and pure_noise:
        z = noise.to(x0)
    else:
        alpha, sigma = diffusion.alpha_sigma(alphas_cumprod=acp, t=timesteps[start].expand(x0.shape[0]))
        z = diffusion.diffuse(x0=x0, eps=noise.to(x0), alpha=alpha, sigma=sigma)

    def alpha_sigma(t):
        return diffusion.alpha_sigma(alphas_cumprod=acp, t=t, final_alpha_cumprod=final_alpha_cumprod)

    def predict_x0(z_, t_):
        return denoiser(z_, t_, text, parametrisation="x0", **denoiser_kwargs)

    for i in tqdm(range(start, len(timesteps)), desc="edit", disable=not progress):
        t = timesteps[i].expand(x0.shape[0])
        t_prev = timesteps[i + 1].expand(x0.shape[0]) if i + 1 < len(timesteps) else torch.full_like(t, -1)
        z = ddim_step_with(predict_x0, z, t, t_prev, alpha_sigma)
        if callback is not None:
            z = callback(z, t_prev)
    return z


def final_alpha_cumprod_of(pipe) -> float:
    """alpha-bar after the last step (1.0 with ``set_alpha_to_one``), from the pipeline's scheduler."""
    return float(make_scheduler("ddim", pipe.scheduler.config).final_alpha_cumprod)


def save_image(pixels: Tensor, path: Path) -> str:
    """Write one (3,H,W) image in [-1, 1] as PNG; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.to_uint8(pixels[None])[0]).save(path)
    return str(path)


def save_strip(images: Tensor, path: Path, zoom: int = 3) -> str:
    """Write (N,3,H,W) images in [-1, 1] side by side (a grid over a sweep) as one PNG."""
    tiles = [Image.fromarray(a) for a in data.to_uint8(images)]
    w, h = tiles[0].size
    canvas = Image.new("RGB", (len(tiles) * (w * zoom + 2), h * zoom), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile.resize((w * zoom, h * zoom), Image.NEAREST), (i * (w * zoom + 2), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return str(path)


def edit_row(
    *,
    method: str,
    model: str,
    item: EditInput,
    input_path: str,
    output_path: str,
    mask_path: str | None,
    param: dict,
    steps: int,
    guidance_scale: float,
    nfe: int,
    seconds: float,
) -> dict:
    """One row of ``edits.jsonl`` (the contract the eval code reads)."""
    return {
        "method": method,
        "model": str(model),
        "input": input_path,
        "output": output_path,
        "mask": mask_path,
        "prompt": item.prompt,
        "source_prompt": item.source_prompt,
        "param": param,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "nfe": nfe,
        "seconds": round(seconds, 4),
        "target_attributes": item.target_attributes,
        "input_attributes": item.input_attributes,
    }


def write_rows(out: Path, rows: list[dict]) -> Path:
    """Write ``edits.jsonl`` atomically (temp file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".edits.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "edits.jsonl")
    return out / "edits.jsonl"


def finetune_guidance_scale(info: dict) -> float:
    """The scale a guidance-conditioned student is fine-tuned at with the plain denoising loss: 1, where it
    predicts the conditional model (the loss's target), or the lowest scale it was distilled on when its
    ``fewstep.json`` range starts above 1."""
    return max(1.0, float(info.get("guidance", {}).get("range", [1.0])[0]))


def load_mask(path: str | Path, image_path: str | Path | None, resolution: int) -> Tensor:
    """A binary (1,H,W) mask (1 = region to repaint, white in the file) with the image's resize and
    centre-crop; down-sampling is a max-pool so thin strokes survive. Errors on a size mismatch
    with the image or an empty mask."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mask = np.array(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise FewstepError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FewstepError(f"cannot read {path} as a mask image ({e.__class__.__name__})") from None
    if image_path is not None:
        try:
            with Image.open(image_path) as im:
                size = im.size
        except (FileNotFoundError, UnidentifiedImageError, OSError):
            raise FewstepError(f"cannot read {image_path} as an image") from None
        if size != (mask.shape[1], mask.shape[0]):
            raise FewstepError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}")
    m = torch.from_numpy(mask > 0.5).float()[None, None]
    if not m.any():
        raise FewstepError(f"mask {path} is empty: paint the region to repaint white")
    h, w = m.shape[-2:]
    scale = resolution / min(w, h)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    m = F.adaptive_max_pool2d(m, size) if scale < 1 else F.interpolate(m, size=size, mode="nearest")
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return m[0, :, top : top + resolution, left : left + resolution]


def latent_mask(mask: Tensor, latent_size: int) -> Tensor:
    """A pixel mask (...,1,H,W) at latent resolution by max-pooling (a latent cell is repainted if any
    of its pixels is), so thin strokes are not lost as with nearest down-sampling."""
    return F.adaptive_max_pool2d(mask, latent_size)
