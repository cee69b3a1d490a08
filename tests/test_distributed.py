"""The distributed path: two CPU processes (gloo) train the same value model as one process with the same global
batch, and only rank 0 writes the output directory (issue #13)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transfertune.io.run_dirs import read_run

# Runs `transfertune train` (argv after the log path) and records, per rank, the Trainer's logs and every file
# operation under --output (Python audit events), so the test can see who wrote what.
LAUNCHED = r'''
import json, os, sys
from pathlib import Path

log_path, argv = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ.get("RANK", "0"))
output = os.path.realpath(argv[argv.index("--output") + 1])
writes = []

def audit(event, args):
    if event not in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
        return
    path, mode, flags = (list(args) + [None, None, 0])[:3]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return
    if event == "open" and not ((isinstance(mode, str) and set(mode) & set("wax+"))
                                or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
        return
    if os.path.realpath(os.fsdecode(path)).startswith(output):
        writes.append([event, os.fsdecode(path)])

sys.addaudithook(audit)
from transfertune.training.value_trainer import ValueTrainer
from transfertune.cli.main import main

logs = []
original_log = ValueTrainer.log
def log(self, entry, *args, **kwargs):
    logs.append(dict(entry))
    return original_log(self, entry, *args, **kwargs)
ValueTrainer.log = log

code = main(argv)
log_path.with_name(f"{log_path.name}.{rank}").write_text(json.dumps({"code": code, "logs": logs, "writes": writes}))
sys.exit(code)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _report(log: Path, rank: int) -> dict:
    return json.loads(log.with_name(f"{log.name}.{rank}").read_text())


@pytest.fixture()
def train_argv(tmp_path, model_dir, yes_no_records):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    base = model_dir("llama", seed=3)
    return script, ["train", "--base", base, "--data", str(data), "--max-steps", "4", "--lr", "1e-2",
                    "--logging-steps", "1", "--seed", "0", "--l1", "0.01"]


def test_two_processes_train_what_one_process_trains(tmp_path, train_argv):
    """Global batch 8 either way (2 x 4 or 1 x 8): the same batches, losses, gradient norms and weights."""
    script, argv = train_argv
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate is a dependency: its launcher should be in the venv"
    _run([sys.executable, str(script), str(tmp_path / "one.log"), *argv, "--output", str(tmp_path / "one"),
          "--batch-size", "8"])
    # `accelerate launch --cpu` starts a single process whatever --num_processes says (several CPU processes need
    # mpirun there); --multi_gpu starts torchrun's processes, and ACCELERATE_USE_CPU=true puts them on gloo
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script),
          str(tmp_path / "two.log"), *argv, "--output", str(tmp_path / "two"), "--batch-size", "4"])
    one, two = tmp_path / "one", tmp_path / "two"
    assert read_run(one)["processes"] == 1 and read_run(two)["processes"] == 2

    steps = lambda log: [e for e in log["logs"] if "loss" in e]  # noqa: E731
    single, rank0, rank1 = _report(tmp_path / "one.log", 0), _report(tmp_path / "two.log", 0), \
        _report(tmp_path / "two.log", 1)
    assert len(steps(single)) == len(steps(rank0)) == 4
    for a, b in zip(steps(single), steps(rank0)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (steps(single), steps(rank0))
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (steps(single), steps(rank0))
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-4, msg=name)

    # only rank 0 wrote the output directory; it holds what a one-process run leaves
    assert rank0["writes"] and not rank1["writes"], rank1["writes"]
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}


def test_processes_that_would_each_train_alone_are_refused(monkeypatch):
    """torchrun / `accelerate launch --multi_gpu` without GPUs and without ACCELERATE_USE_CPU: each process would
    train alone and write the same --output."""
    from types import SimpleNamespace

    from transfertune.io.validate import InputError
    from transfertune.training.value_trainer import check_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="launched as 2 processes.*ACCELERATE_USE_CPU=true"):
        check_distributed(SimpleNamespace(world_size=1))
    check_distributed(SimpleNamespace(world_size=2))
