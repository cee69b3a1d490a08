"""The package as a user gets it: a wheel, installed outside the checkout, works on its own (CLI, training,
generation, the built-in family and tasks found as package data)."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site directory holding the installed wheel, environment that imports it first)."""
    tmp = tmp_path_factory.mktemp("wheel")
    import importlib.util

    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp / "dist").glob("transfertune-*.whl"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERTUNE_")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return site, env, wheel


def run(args, env, cwd):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_wheel_carries_the_family_and_tasks_but_no_test_helpers(installed):
    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "transfertune/family/models/mini-s/model.safetensors" in names
    assert "transfertune/evaluation/builtin_tasks/people_qa/train.jsonl" in names
    assert "transfertune/evaluation/builtin_tasks/arithmetic/shifted_test.jsonl" in names
    assert not [n for n in names if "fuzz" in n or n.startswith("tests/")]


def test_installed_wheel_trains_and_generates_outside_the_checkout(installed, model_dir, yes_no_records, tmp_path):
    site, env, _ = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = run(["-c", "import transfertune, transfertune.io.locations as l; print(transfertune.__file__); "
                       "print(l.builtin_models_dir()); from transfertune.evaluation.tasks import load_task; "
                       "print(len(load_task('people_qa', 'train')))"], env, work)
    assert probe.returncode == 0, probe.stderr
    module_file, models_dir, rows = probe.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(models_dir).is_relative_to(site)
    assert int(rows) > 0

    help_ = run(["-m", "transfertune", "--help"], env, work)
    assert help_.returncode == 0 and "train" in help_.stdout and "generate" in help_.stdout
    models = run(["-m", "transfertune", "models"], env, work)
    assert models.returncode == 0 and "mini-s" in models.stdout and "mini-l" in models.stdout

    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    base = model_dir("llama", seed=11)
    train = run(["-m", "transfertune", "train", "--base", base, "--data", str(data), "--output", str(work / "v"),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"], env, work)
    assert train.returncode == 0, train.stderr
    assert (work / "v" / "model.safetensors").is_file() or any((work / "v").glob("*.safetensors"))
    gen = run(["-m", "transfertune", "generate", "--base", base, "--value", str(work / "v"), "--max-new-tokens",
               "3", "Is it good?"], env, work)
    assert gen.returncode == 0, gen.stderr
    checkout_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the same command from this checkout
    same = run(["-m", "transfertune", "generate", "--base", base, "--value", str(work / "v"), "--max-new-tokens",
                "3", "Is it good?"], checkout_env, work)
    assert same.returncode == 0 and gen.stdout == same.stdout and len(gen.stdout.splitlines()) == 1
