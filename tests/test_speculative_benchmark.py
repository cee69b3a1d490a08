"""The speculative benchmark runs end to end on tiny models: ratios, the time of a round, a deeper target."""
import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("speculative_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_speculative_benchmark_writes_ratios_and_round_times(model_dir, tmp_path):
    bench = load_bench()
    out = tmp_path / "speculative.json"
    bench.main(["--target", model_dir("llama", hidden=48, seed=1), "--draft", model_dir("llama", seed=2),
                "--value", str(tmp_path / "none"), "--batch-sizes", "1", "3", "--prompt-len", "8",
                "--new-tokens", "6", "--repeats", "1", "--deeper", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert [(r["target"].endswith("x2 deep"), r["batch"]) for r in result["rows"]] == \
        [(False, 1), (False, 3), (True, 1), (True, 3)]
    for row in result["rows"]:
        assert set(row["speedup_vs_target_alone"]) == {"composed", "per-row", "rectangular", "exact"}
        per_row = row["rounds"]["per-row"]
        assert per_row["rounds"] > 0 and 1 <= per_row["tokens_per_row_per_round"] <= per_row["mean_draft_len"] + 1
        assert per_row["ms_per_round"]["draft"] > 0 and per_row["ms_per_round"]["verify"] > 0
    assert "per-row" in bench.format_table(result) and "% verifying" in bench.notes(result)


def test_deepened_target_computes_the_same_logits(model_dir):
    from transfertune.io.loading import load_causal_lm

    model = load_causal_lm(model_dir("llama", hidden=48, seed=1))
    deep = load_bench().deepened(model, 3)
    assert deep.config.num_hidden_layers == 3 * model.config.num_hidden_layers
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        assert torch.allclose(deep(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
