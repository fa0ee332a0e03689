import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(sys.executable), reason="torchrun missing"
)


def _torchrun(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29400 + os.getpid() % 500),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_processes_keep_equal_replicas(tmp_path):
    result = _torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["unused_kept"]  # no gradient on any rank: not zero-filled and decayed


def test_ranks_that_see_different_checkpoints_stop_together_with_one_line(tmp_path):
    """Rank 0 would resume at step 2 and rank 1 start at 0 (their all-reduces then pair up wrongly and hang)."""
    result = _torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), "split-folders")
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert all(e and "different checkpoints" in e and "steps 0 to 2" in e for e in errors), errors


def test_smoke_chain_trains_and_distils_on_two_processes(tmp_path):
    result = _torchrun("-m", "fewstep", "run", "configs/smoke.yaml", f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "teacher" / "train" / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2
    assert (tmp_path / "teacher" / "model" / "model_index.json").is_file()
    # the same run distils on both processes (one loop, so the same DDP path) and saves each student once
    for round_log in ("guidance/train", "guided_progressive/train/round-1", "progressive/train/round-1"):
        first = json.loads((tmp_path / round_log / "log.jsonl").read_text().splitlines()[0])
        assert first["world_size"] == 2, round_log
    assert (tmp_path / "guided_progressive" / "model" / "fewstep.json").is_file()
    # the distillation pool, drawn half on each process and gathered, is the pool one process draws
    from safetensors.torch import load_file

    from baselines import models
    from distill.data import PoolConfig, teacher_pool

    pipe = models.load_pipeline(tmp_path / "teacher" / "model")
    pool = teacher_pool(
        pipe, PoolConfig(size=8, steps=2, batch_size=8), guidance_range=(1.0, 4.0), cache=tmp_path / "one"
    )
    two = load_file(tmp_path / "guidance" / "pool" / "pool.safetensors")
    torch.testing.assert_close(two["x0"], pool["x0"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two["text"], pool["text"], rtol=1e-5, atol=1e-5)


def test_sweep_on_two_processes_writes_the_single_process_rows_once(tmp_path):
    """The sweep stage under torchrun (image i generated on rank i % 2, gathered, rows written by rank 0) gives
    the rows of the same sweep in one process: same cells, metric values, nfe and n_images, each row once."""
    from conftest import run_cli
    from tiny_sweep import save_tiny_models, sweep_fields

    root = save_tiny_models(tmp_path / "models")
    stage = {"kind": "sweep", **sweep_fields(root, tmp_path / "unused"), "cache_dir": "${run_dir}/cache"}
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"experiment": "sweep-ddp", "stages": {"sweep": stage}}))  # JSON is YAML
    two = _torchrun("-m", "fewstep", "run", str(config), f"run_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("run", str(config), f"run_dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    timing = {"seconds_per_image", "images_per_second", "processes", "threads"}

    def cells(run):
        rows = [json.loads(line) for line in (tmp_path / run / "sweep" / "results.jsonl").read_text().splitlines()]
        by_hash = {r["config_hash"]: r for r in rows}
        assert len(by_hash) == len(rows) == 6, [r["config_hash"] for r in rows]  # no cell written twice
        assert {r["processes"] for r in rows} == {2 if run == "two" else 1}
        return {h: {k: v for k, v in r.items() if k not in timing} for h, r in by_hash.items()}

    two_rows, one_rows = cells("two"), cells("one")
    assert two_rows.keys() == one_rows.keys()
    for h, row in one_rows.items():
        assert two_rows[h].keys() == row.keys()
        for key, value in row.items():
            if isinstance(value, float) or key.endswith("_ci95") or key == "attributes":
                assert two_rows[h][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (row["label"], key)
            else:
                assert two_rows[h][key] == value, (row["label"], key)


def test_eval_verb_on_two_processes_reports_every_cell_once(tmp_path):
    """``fewstep eval`` under torchrun: both processes generate, rank 0 alone writes the rows and then the report,
    after the last cell's row (the report of a rank that ran ahead said '1 cells' of 2)."""
    from tiny_sweep import save_tiny_models

    root = save_tiny_models(tmp_path / "models")
    clip, out = str(root / "clip"), tmp_path / "eval"
    result = _torchrun(
        "-m", "fewstep", "eval", f"t={root / 'teacher'}", "--out", str(out), "--steps", "1", "2",
        "--n-images", "4", "--reference-images", "8", "--extractors", f"clip:{clip}", "--clip", clip,
        "--bootstrap", "2", "--grid-images", "2", "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["steps"] for r in rows) == [1, 2] and {r["processes"] for r in rows} == {2}
    assert "(2 cells, 4 images per cell)" in (out / "report" / "report.md").read_text()
    assert result.stdout.count("wrote") == 1
