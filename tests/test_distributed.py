import json
import os
import shutil
import subprocess
import sys

import pytest
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
