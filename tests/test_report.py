"""edit_eval on synthetic edits.jsonl rows, and the report rendered from a sweep + edit folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from baselines import data, models
from eval import report as R
from eval.edits import EditEvalStage, run_edit_eval
from eval.sweep import SweepStage, run_sweep


def _save(x: torch.Tensor, path) -> str:
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    """An editing stage's folder: SDEdit-like rows whose change grows with strength, confined to a mask."""
    root = tmp_path_factory.mktemp("sdedit")
    ds = data.ShapesDataset(split="heldout", resolution=16)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(3, 16, 16)
    mask[:, :, 8:] = 1  # white right half: the region the edit may change
    mask_path = _save(mask, root / "mask.png")
    rows = []
    for i in range(4):
        image, attrs = ds.sample(i)
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        inp = _save(x, root / f"in{i}.png")
        target = {**{k: attrs[k] for k in data.ATTRIBUTES}, "size": "large" if attrs["size"] == "small" else "small"}
        for strength in (0.3, 0.8):
            y = (x + strength * mask * torch.rand(x.shape, generator=g)).clamp(0, 1)
            out = _save(y, root / f"out{i}_{strength}.png")
            rows.append(
                {"method": "sdedit", "model": "teacher", "input": inp, "output": out, "mask": mask_path,
                 "prompt": data.caption(target), "source_prompt": data.caption(attrs), "param": {"strength": strength},
                 "steps": 8, "nfe": 16, "seconds": 0.1, "target_attributes": target,
                 "input_attributes": {k: attrs[k] for k in data.ATTRIBUTES}}
            )  # fmt: skip
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_edit_eval_groups_by_param_and_measures_fidelity(edit_folder, tmp_path, tiny_clip_folder):
    rows = run_edit_eval(EditEvalStage(edits=[str(edit_folder)], clip=str(tiny_clip_folder)), tmp_path / "ee")
    assert [(r["method"], r["value"], r["n"]) for r in rows] == [("sdedit", 0.3, 4), ("sdedit", 0.8, 4)]
    weak, strong = rows
    assert weak["PSNR"] > strong["PSNR"] and weak["SSIM"] > strong["SSIM"]
    assert weak["PSNR unmasked"] == 100 and strong["SSIM unmasked"] > strong["SSIM"]  # untouched outside the mask
    from eval.edits import group_metrics

    members = [json.loads(line) for line in (edit_folder / "edits.jsonl").read_text().splitlines()][:4:2]
    everything = _save(torch.ones(3, 16, 16), tmp_path / "all.png")  # repaint all: no unmasked pixel to score
    one_full = group_metrics(None, [members[0], {**members[1], "mask": everything}], [edit_folder] * 2)
    alone = group_metrics(None, members[:1], [edit_folder])
    assert one_full["SSIM unmasked"] == alone["SSIM unmasked"] and one_full["PSNR unmasked"] == alone["PSNR unmasked"]
    assert "PSNR unmasked" not in group_metrics(None, [{**members[0], "mask": everything}], [edit_folder])
    # accuracies: the edited key (size) vs the four kept ones, as the CLIP reads the saved 0.3-strength outputs
    from eval.metrics import clip_image_similarity, load_clip_model, zero_shot_correct

    clip = load_clip_model(str(tiny_clip_folder))
    lines = [json.loads(line) for line in (edit_folder / "edits.jsonl").read_text().splitlines()]
    group = [r for r in lines if r["param"]["strength"] == 0.3]

    def load(key):
        return torch.stack([torch.from_numpy(np.array(Image.open(r[key]))).permute(2, 0, 1) / 255 for r in group])

    outputs, inputs = load("output"), load("input")
    correct = zero_shot_correct(
        clip.model, clip.tokenizer, clip.pixels(outputs * 2 - 1), [r["target_attributes"] for r in group]
    )
    kept = [k for k in data.ATTRIBUTES if k != "size"]
    assert weak["target attribute accuracy"] == pytest.approx(float(np.mean(correct["size"])))
    assert weak["preserved attribute accuracy"] == pytest.approx(float(np.mean([correct[k] for k in kept])))
    similarity = clip_image_similarity(clip, outputs * 2 - 1, inputs * 2 - 1).mean()
    assert weak["CLIP image similarity"] == pytest.approx(float(similarity), abs=1e-6)
    from eval.metrics import lpips_unavailable

    if lpips_unavailable():  # as here (torchvision does not import): left out, with the reason noted
        assert "LPIPS" not in weak
        assert (tmp_path / "ee" / "NOTES.txt").read_text().startswith("LPIPS left out")
    else:
        assert weak["LPIPS"] < strong["LPIPS"]
    assert (tmp_path / "ee" / "edit_results.jsonl").read_text().count("\n") == 2


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(2)
    tok = models.build_tokenizer()
    return models.save_clip(models.build_clip(models.get_preset("tiny"), tok), tok, root / "clip")


def test_report_renders_tables_plots_and_grids(tmp_path, tiny_clip_folder, edit_folder):
    run = tmp_path / "run"
    folder = models.save_pipeline(models.build_pipeline("tiny", seed=0), tmp_path / "teacher", {"method": "teacher"})
    cfg = SweepStage(
        models=[
            {"name": "teacher", "path": str(folder), "samplers": ["ddim", "unipc"], "steps": [1, 2]},
            {"name": "teacher", "path": str(folder), "samplers": ["unipc"], "steps": [2], "guidance_scales": [1.0]},
        ],
        guidance_scales=[3.0],
        n_images=4,
        reference_images=16,
        extractors=[f"clip:{tiny_clip_folder}"],
        clip=str(tiny_clip_folder),
        bootstrap=4,
        batch_size=4,
        grid_images=4,
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(run_sweep(cfg, run / "sweep")) == 5
    run_edit_eval(EditEvalStage(edits=[str(edit_folder)], clip=str(tiny_clip_folder)), run / "edits")
    report = R.report_run_dir(run)
    text = report.read_text()
    for needle in ("### FD-clip", "### CLIP score", "### seconds_per_image", "teacher + UniPC", "Edit fidelity"):
        assert needle in text
    pngs = {p.name for p in report.parent.glob("*.png")}
    assert {"sweep_FD-clip_vs_nfe.png", "sweep_CLIP_score_vs_nfe.png", "sweep_tradeoff.png"} <= pngs
    assert {"sweep_grid_teacher.png", "edits_edits.png"} <= pngs
    for name in pngs:
        assert f"({name})" in text
        with Image.open(report.parent / name) as im:
            assert im.width > 100 and np.asarray(im.convert("L")).std() > 5  # not blank
    with Image.open(report.parent / "sweep_grid_teacher.png") as im:
        assert im.height >= 5 * 16 * 3  # one strip per cell


def test_stage_times_table_lists_finished_stages_in_order_with_the_total(tmp_path):
    import json
    import os

    for i, (name, status, seconds) in enumerate([("b", "done", 30.4), ("a", "done", 12.0), ("c", "running", 5)]):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "stage.json"
        path.write_text(json.dumps({"name": name, "kind": "k", "status": status, "seconds": seconds}))
        os.utime(path, (1000 + i, 1000 + i))
    lines = R.stage_times_section(tmp_path)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| stage")]
    assert rows == ["| b | k | 30 |", "| a | k | 12 |", "| **total** | | **42** (0.7 min) |"]
    assert R.stage_times_section(tmp_path / "b") == []


def test_report_of_an_empty_run_says_so(tmp_path):
    from baselines.errors import FewstepError

    with pytest.raises(FewstepError, match="no stage folder"):
        R.report_run_dir(tmp_path)


def test_bench_measures_overhead_and_replaces_its_section(tmp_path):
    from eval import bench

    folder = models.save_pipeline(models.build_pipeline("tiny", seed=0), tmp_path / "t", {"method": "teacher"})
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    rows = bench.run_bench([f"tiny={folder}"], [1, 2], out=out, guidance_scale=3.0, batch_size=2, repeats=3)
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [("tiny", 1, 2), ("tiny", 2, 4)]
    for r in rows:  # what the bare work measures is checked by the hook test below
        assert r["raw_seconds_per_image"] > 0 and r["unet_ms_per_call"] > 0 and r["vae_decode_ms"] > 0
        assert r["text_encoding_ms"] > 0 and r["overhead_beyond_text"] < r["overhead"]
        assert f"{r['overhead']:.2f} [{r['overhead_q1']:.2f}, {r['overhead_q3']:.2f}]" in out.read_text()
    bench.run_bench([str(folder)], [1], out=out, guidance_scale=3.0, batch_size=2, repeats=1)
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept text") and text.count(bench.START) == 1
    assert "| tiny |" not in text and "| t | teacher |" in text  # the section was replaced, not appended


def test_bench_row_is_the_median_repeat_with_the_quartiles_of_the_ratios(tmp_path, monkeypatch):
    """Timings fed in: each repeat's ratio is its pipeline time over its U-Net + VAE time; the row keeps the
    median repeat (its own text time too) and the quartiles of the five ratios."""
    from eval import bench

    folder = models.save_pipeline(models.build_pipeline("tiny", seed=0), tmp_path / "t", {"method": "teacher"})
    pipeline = iter([1.0, 1.2, 1.1, 1.4, 1.3])
    text = iter([0.01, 0.02, 0.03, 0.04, 0.05])
    fixed = {"unet": lambda: 0.75, "vae": lambda: 0.25, "text": lambda: next(text), "run": lambda: next(pipeline)}
    monkeypatch.setattr(bench, "_seconds", lambda fn, device: fixed[fn.__name__]())
    (row,) = bench.bench_model(str(folder), [1], guidance_scale=1.0, batch_size=2, repeats=5)
    assert row["overhead"] == pytest.approx(1.2) and row["text_encoding_ms"] == pytest.approx(20.0)
    assert (row["overhead_q1"], row["overhead_q3"]) == (pytest.approx(1.1), pytest.approx(1.3))
    assert row["seconds_per_image"] == pytest.approx(0.6) and row["overhead_beyond_text"] == pytest.approx(1.2 / 1.02)


@pytest.mark.parametrize("guidance_scale, conditioned", [(1.0, False), (3.0, False), (3.0, True)])
def test_bench_bare_work_is_the_work_the_pipeline_does(guidance_scale, conditioned):
    """The raw side of the overhead ratio: ``bare_work`` makes as many U-Net forwards on inputs of the same
    shapes as ``generate`` does (the CFG pair batched; for a guidance-conditioned student one pass fed the same
    guidance embedding), and one VAE decode of the same latent shape."""
    from baselines.samplers import generate, unet_evaluations
    from distill.student import guidance_conditioned_unet
    from eval.bench import bare_work

    pipe = models.build_pipeline("tiny", seed=0)
    if conditioned:
        pipe.unet = guidance_conditioned_unet(pipe.unet, 8)
    prompts = ["a red circle", "a blue square", "a red circle"]
    seen = []

    def hook(name):
        def record(module, args, kwargs, out):
            cond = kwargs.get("timestep_cond")
            states = kwargs.get("encoder_hidden_states", torch.zeros(0)).shape
            seen.append((name, tuple(args[0].shape), states, None if cond is None else cond.tolist()))

        return record

    handles = [
        pipe.unet.register_forward_hook(hook("unet"), with_kwargs=True),
        pipe.vae.decoder.register_forward_hook(hook("vae"), with_kwargs=True),
    ]
    steps = 3
    generate(pipe, prompts, seeds=[0, 1, 2], num_inference_steps=steps, guidance_scale=guidance_scale, batch_size=3)
    from_pipeline, seen[:] = list(seen), []
    calls = unet_evaluations(
        sampler="ddim", steps=steps, guidance_scale=guidance_scale, guidance_conditioned=conditioned
    ) // (2 if guidance_scale > 1 and not conditioned else 1)
    unet, vae, _ = bare_work(pipe, prompts, guidance_scale, calls)
    unet()
    vae()
    for h in handles:
        h.remove()
    assert len([s for s in from_pipeline if s[0] == "unet"]) == calls
    assert seen == from_pipeline


def test_bench_device_errors_are_one_line():
    from baselines.errors import FewstepError
    from eval.bench import bench_device

    assert bench_device("cpu") == torch.device("cpu")
    with pytest.raises(FewstepError, match="not a torch device"):
        bench_device("gpu")
    with pytest.raises(FewstepError, match="CPU or CUDA"):
        bench_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(FewstepError, match="no such CUDA device"):
            bench_device("cuda")


def test_rows_that_would_share_a_table_cell_get_distinct_lines():
    """Two progressive chains of one method, and one chain's student under a second sampler, would collapse into
    one (label, s, steps) cell; a chain's own step counts stay one line, the teacher's label is untouched."""
    label = "progressive student (CFG s=4 distilled)"

    def row(path, steps, sampler="ddim", model="m", lab=label):
        return {"label": lab, "guidance_scale": 1.0, "steps": steps, "sampler": sampler, "path": path, "model": model}

    rows = [
        row("runs/a/teacher/model", 8, lab="teacher + DDIM"),
        row("runs/a/progressive/progressive-4step", 4),
        row("runs/a/progressive/progressive-2step", 2),
        row("runs/a/progressive_b/progressive-4step", 4),
        row("runs/a/progressive/progressive-4step", 4, sampler="euler"),
    ]
    labels = [r["label"] for r in R.distinct_lines(rows)]
    assert labels[0] == "teacher + DDIM"
    assert len({(lab, r["steps"]) for lab, r in zip(labels, rows)}) == len(rows)
    assert labels[1] == labels[2]  # one chain, one line
    assert labels[4].startswith(f"{label} [Euler]") and "progressive_b" in labels[3]
    assert [r["label"] for r in R.distinct_lines(rows[:3])] == [r["label"] for r in rows[:3]]  # no clash: as is
    # two chains at disjoint step counts, and a student under a second sampler at another step count, share no
    # cell but are not one line
    apart = [row("runs/v/progressive/progressive-4step", 4), row("runs/x0/progressive/progressive-2step", 2, model="n"),
             row("runs/v/progressive/progressive-1step", 1, sampler="heun")]  # fmt: skip
    labels = [r["label"] for r in R.distinct_lines(apart)]
    assert labels == [f"{label} [DDIM] [m]", f"{label} [DDIM] [n]", f"{label} [Heun]"]


def test_metric_plots_go_log_only_when_values_span_a_wide_range():
    """A 1-step sampler's FD of ~1000 next to students' ~60-70 (over 10x) gets a log axis; CLIP scores
    (85-92) or any set with a non-positive value keep a linear one."""
    assert R.wide_range([1035.0, 698.6, 71.7, 62.0])
    assert not R.wide_range([86.9, 91.6, 90.2])
    assert not R.wide_range([0.0, 5.0, 500.0]) and not R.wide_range([])


def test_cost_plot_shows_a_lone_cell_only_beside_a_line_at_its_scale(tmp_path, monkeypatch):
    """A model's cell at another guidance scale is a point with its interval when some line is drawn at that
    scale (the teacher's 2 CFG steps at s = 4 beside the students' s = 4 line); otherwise it is left to the
    trade-off plot."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))

    def row(label, steps, scale):
        return {"label": label, "steps": steps, "nfe": steps, "guidance_scale": scale, "FD": 10.0 + steps,
                "FD_ci95": [9.0 + steps, 11.0 + steps]}  # fmt: skip

    rows = [row("A", 1, 2.0), row("A", 2, 2.0), row("A", 1, 4.0), row("A", 4, 4.0)]
    rows += [row("B", 2, 2.0), row("B", 4, 2.0), row("B", 2, 4.0), row("B", 2, 3.0)]
    R.plot_vs_nfe(rows, "FD", tmp_path / "plot.png")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert sorted(legend) == ["A, s=2", "A, s=4", "B, s=2", "B, s=4"]  # B at s = 3: no line there
    assert (tmp_path / "plot.png").is_file()


def test_fd_columns_keep_the_sweeps_extractor_order():
    """The first FD column is the trade-off plot's: the sweep's first extractor, not the alphabetically first."""
    rows = [{"FD-embedded": 1.0, "FD-embedded_ci95": [0.5, 1.5], "FD-clip": 2.0}, {"FD-embedded": 3.0, "FID": 4.0}]
    assert R.fd_keys(rows) == ["FD-embedded", "FD-clip", "FID"]
