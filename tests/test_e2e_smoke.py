"""End-to-end on the smoke config: the teacher folder is a stock diffusers pipeline."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image

PROMPT = "a small red circle on a blue background, top left"


def test_teacher_folder_is_complete(smoke_run):
    folder = smoke_run / "teacher" / "model"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "fewstep.json"):
        assert (folder / part).exists(), part
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    info = json.loads((folder / "fewstep.json").read_text())
    assert info["method"] == "teacher" and info["recommended"]["num_inference_steps"] == 4
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"]
    assert sched["timestep_spacing"] == "trailing" and sched["num_train_timesteps"] == 1024
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 1.0  # measured from data, not left at the default


def test_finetune_teacher_changes_only_the_unet(smoke_run):
    """The smoke ``refine`` stage (finetune_teacher at t <= 100) saves a whole pipeline whose U-Net moved
    and whose VAE and text encoder are the teacher's, bit for bit."""
    from safetensors.torch import load_file

    teacher, refined = smoke_run / "teacher" / "model", smoke_run / "refine" / "model"

    def weights(folder, part):
        return load_file(next((folder / part).glob("*.safetensors")))

    for part in ("vae", "text_encoder"):
        a, b = weights(teacher, part), weights(refined, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a, b = weights(teacher, "unet"), weights(refined, "unet")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    info = json.loads((refined / "fewstep.json").read_text())
    assert info["parent"] == str(teacher) and info["config"]["max_timestep"] == 100
    assert info["recommended"] == json.loads((teacher / "fewstep.json").read_text())["recommended"]


@pytest.mark.parametrize(
    "model",
    ["teacher/model", "guidance/model", "guided_progressive/progressive-2step", "progressive/progressive-1step"],
)
def test_stock_pipeline_in_a_fresh_offline_process_matches_fewstep_sample(smoke_run, tmp_path, model):
    """Teacher and every kind of student: the stock pipeline at the recommended steps and guidance
    in a fresh offline process gives fewstep's images."""
    folder = smoke_run / model
    result = run_cli(
        "sample", str(folder), "--prompt", PROMPT, "--seed", "7", "--num-images", "2", "--out", str(tmp_path / "ours")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "ours" / "samples.json").read_text())
    rec = json.loads((folder / "fewstep.json").read_text())["recommended"]
    assert (meta["num_inference_steps"], meta["guidance_scale"]) == (rec["num_inference_steps"], rec["guidance_scale"])
    if model == "teacher/model":
        assert meta["num_inference_steps"] == 4 and meta["guidance_scale"] == 3.0
    steps, scale = meta["num_inference_steps"], meta["guidance_scale"]
    script = f"""
import torch, numpy as np
from PIL import Image
from diffusers import StableDiffusionPipeline, DDIMScheduler
pipe = StableDiffusionPipeline.from_pretrained({str(folder)!r}, dtype=torch.float32)
for seed in (7, 8):
    g = torch.Generator().manual_seed(seed)
    image = pipe({PROMPT!r}, num_inference_steps={steps}, guidance_scale={scale}, generator=g).images[0]
    image.save({str(tmp_path)!r} + f"/stock-{{seed}}.png")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for seed in (7, 8):
        ours = np.asarray(Image.open(tmp_path / "ours" / f"{seed:06d}.png")).astype(int)
        stock = np.asarray(Image.open(tmp_path / f"stock-{seed}.png")).astype(int)
        assert np.abs(ours - stock).max() <= 1


def test_sigkill_during_teacher_training_resumes(tmp_path):
    args = [
        sys.executable,
        "-m",
        "fewstep",
        "run",
        "configs/smoke.yaml",
        f"run_dir={tmp_path}",
        "stages.teacher.train.steps=400",
        "stages.teacher.train.checkpoint_every=20",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "teacher" / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("step-*")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert killed_at < 400
    assert json.loads((tmp_path / "teacher" / "stage.json").read_text())["status"] == "running"
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "teacher" / "train" / "log.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert resumes and resumes[-1]["step"] >= killed_at
    assert json.loads((tmp_path / "teacher" / "stage.json").read_text())["status"] == "done"


def test_cli_errors_are_one_line(tmp_path, smoke_run):
    result = run_cli("sample", str(tmp_path / "nothing"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(smoke_run / "teacher" / "model", broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    result = run_cli("sample", str(broken), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "corrupt" in result.stderr and weights.name in result.stderr
    assert "Traceback" not in result.stderr
    shutil.rmtree(broken)
    shutil.copytree(smoke_run / "teacher" / "model", broken)
    shutil.rmtree(broken / "vae")
    result = run_cli("sample", str(broken), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "vae/" in result.stderr
    result = run_cli(
        "sample",
        str(smoke_run / "teacher" / "model"),
        "--prompt",
        "x",
        "--sampler",
        "bogus",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 1 and "unknown sampler" in result.stderr
