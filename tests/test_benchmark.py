"""The decode benchmark runs end to end on tiny models and reports what docs/performance.md needs."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"


def test_decode_benchmark_writes_table_json_and_plot(model_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("decode_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decode.json"
    bench.main(["--target", model_dir("llama", hidden=48, seed=1), "--draft", model_dir("llama", seed=2),
                "--value", str(tmp_path / "none"), "--batch-sizes", "1", "2", "--prompt-lens", "8",
                "--new-tokens", "6", "--repeats", "1", "--speculative-max-batch", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    b1, b2 = result["rows"]
    assert {"target", "value", "draft", "composed", "proxy", "naive", "speculative", "speculative_exact",
            "speculative_transformers"} == set(b1["seconds_per_step"])
    assert "speculative" not in b2["seconds_per_step"]  # above --speculative-max-batch
    assert 0 <= b1["speculative"]["acceptance"] <= 1 and b1["speculative"]["mean_draft_len"] >= 1
    assert "batch 1: speculative decoding runs at" in bench.speculation_note(result)
    assert b1["ratio_to_limit"]["composed"] > 0
    mem = result["memory_mb"]
    assert mem["composed"] > 0 and mem["composed_over_sum"] > 0


def test_overlap_benchmark_reports_both_limits(model_dir, tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "overlap.py"
    spec = importlib.util.spec_from_file_location("overlap_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "overlap.json"
    bench.main(["--target", model_dir("llama", hidden=48, seed=1), "--draft", model_dir("llama", seed=2),
                "--value", str(tmp_path / "none"), "--batch-sizes", "1", "2", "--new-tokens", "4", "--prompt-len", "8",
                "--repeats", "1", "--threads", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and len(result["rows"]) == 2
    for row in result["rows"]:
        t = row["seconds_per_step"]
        assert row["sequential_limit"] == round(t["base"] + t["value"], 6)
        assert row["parallel_limit"] == round(max(t["base"], t["value"]), 6)
        assert set(t) == {"base", "value", "sequential_1", "sequential_2", "overlapped"}
