"""GLAM training on several processes: torch DistributedDataParallel, gloo on two CPU processes.

The same code path runs NCCL on GPUs (``torchrun --nproc-per-node <GPUs> -m dicom_ai train glam``);
here two CPU processes check that gradients are really averaged (both processes end with the
same weights, different from a single-process run's) and that the torchrun command line writes
one bundle.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dicom_ai.networks.glam import Glam
from dicom_ai.training.glam import train

sys.path.insert(0, str(Path(__file__).parent))
from test_glam_train import TINY, _toy_data  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
        net = Glam(TINY)
        history = train(net, _toy_data(16), TINY, stages=[("global", 2), ("local", 1)], batch_size=4, lr=3e-3,
                        beta=0.1, seed=0, device=torch.device("cpu"), progress=False)
        torch.save({"state": net.state_dict(), "history": history}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_average_gradients_and_end_with_the_same_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in r0["state"].items():
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(value, r1["state"][key]), key
    torch.manual_seed(100)
    initial = Glam(TINY).state_dict()
    moved = [k for k, v in r0["state"].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert any(k.startswith("global_net.") for k in moved) and any(k.startswith("local_net.") for k in moved)
    # Each process took half of the 4 batches of an epoch; the record sums both halves.
    assert [h["processes"] for h in r0["history"]] == [2, 2, 2]
    assert r0["history"][0]["loss"] == pytest.approx(r1["history"][0]["loss"])


@pytest.mark.slow
def test_torchrun_command_trains_one_bundle_on_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dicom_ai", "train", "glam", "--train-studies", "2", "--val-studies", "1",
           "--epochs-global", "1", "--epochs-local", "1", "--epochs-joint", "0", "--batch-size", "2",
           "--cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
           "--out", str(tmp_path / "bundle"), "--device", "cpu"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2
    assert all(h["processes"] == 2 for h in manifest["training"]["history"])
    assert (tmp_path / "bundle" / "weights.safetensors").is_file()
