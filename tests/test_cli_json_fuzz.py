"""Fuzzing the CLI's JSON inputs (data rows, a value directory's transfertune.json and config.json), in the
spirit of the server's schema fuzz: whatever the bytes, a command ends with exit 0 or 2 and a message, never a
traceback."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transfertune.cli.main import main

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
ROW_KEYS = ("prompt", "response", "completion", "messages", "deferred", "role", "content")
rows = st.one_of(
    _json,
    st.dictionaries(st.sampled_from(ROW_KEYS), _json, max_size=3),
    st.fixed_dictionaries({"prompt": st.text(max_size=12), "response": st.text(max_size=12)},
                          optional={"deferred": _json}),
)
lines = st.one_of(rows.map(lambda r: json.dumps(r, allow_nan=True)), st.binary(max_size=40).map(
    lambda b: b.decode("utf-8", "replace")), st.just("[" * 5000), st.just('{"prompt": "\\ud800", "response": "x"}'))
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)


@pytest.fixture(scope="module")
def value_dir(model_dir, yes_no_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "v"
    data = out.parent / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records[:8]))
    base = model_dir("llama", seed=21)
    assert main(["train", "--base", base, "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "--batch-size", "4"]) == 0
    return base, out


def run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


@FUZZ
@given(st.lists(lines, min_size=1, max_size=4))
def test_score_data_rows_never_trace(value_dir, tmp_path_factory, data_lines):
    base, value = value_dir
    path = tmp_path_factory.mktemp("rows") / "d.jsonl"
    path.write_text("\n".join(data_lines) + "\n", encoding="utf-8", errors="surrogatepass")
    assert run(["score", "--base", base, "--value", str(value), "--data", str(path)]) in (0, 2)


@FUZZ
@given(st.sampled_from(["transfertune.json", "config.json"]), st.one_of(
    _json.map(lambda v: json.dumps(v)), st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.just("[" * 100_000), st.dictionaries(st.sampled_from(
        ["beta", "scheme", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "model_type",
         "init", "lora", "vocab_fingerprint", "training_base"]), _json, max_size=3).map(json.dumps)))
def test_value_dir_json_never_traces(value_dir, tmp_path_factory, name, text):
    base, value = value_dir
    broken = tmp_path_factory.mktemp("dir") / "v"
    shutil.copytree(value, broken)
    original = json.loads((value / name).read_text())
    try:  # half the time: the real file with some fields replaced, so deeper checks are reached
        patch = json.loads(text)
        if isinstance(patch, dict) and patch:
            text = json.dumps({**original, **patch})
    except (ValueError, RecursionError):
        pass
    (broken / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    assert run(["info", str(broken)]) in (0, 2)
    assert run(["generate", "--base", base, "--value", str(broken), "--max-new-tokens", "2", "hi"]) in (0, 2)
