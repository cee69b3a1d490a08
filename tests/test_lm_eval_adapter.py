"""lm-evaluation-harness adapter on a tiny local task (no downloads): loglikelihood and generate_until."""
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from transfertune.evaluation.lm_eval import TransfertuneLM  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.io.loading import load_causal_lm  # noqa: E402

TASKS_YAML = {
    "tt_yesno.yaml": """task: tt_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: [" no", " yes"]
doc_to_target: label
metric_list:
  - metric: acc
""",
    "tt_gen.yaml": """task: tt_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture()
def composed(model_dir, tokenizer):
    return ComposedModel(load_causal_lm(model_dir("llama", hidden=48, seed=1)), tokenizer,
                         [load_causal_lm(model_dir("llama", hidden=32, seed=10))], beta=0.7)


def test_loglikelihood_equals_composed_score(composed):
    lm = TransfertuneLM(base="", composed=composed)
    reqs = [Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 0),
            Instance("loglikelihood", {}, ("Answer:", " yes"), 1)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip([r.args for r in reqs], got):
        assert ll == pytest.approx(float(composed.score([ctx], [cont])[0].sum()), abs=1e-4)
        assert isinstance(greedy, bool)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The cat sat on the mat.",), 0)],
                                       disable_tqdm=True)
    assert rolling[0] < 0


def test_simple_evaluate_on_a_local_task(composed, tmp_path, yes_no_records):
    data = tmp_path / "yesno.jsonl"
    data.write_text("".join(json.dumps({**r, "label": int(r["response"] == " yes")}) + "\n"
                            for r in yes_no_records[:6]))
    for name, text in TASKS_YAML.items():
        (tmp_path / name).write_text(text.format(data=data))
    results = lm_eval.simple_evaluate(model=TransfertuneLM(base="", composed=composed),
                                      tasks=["tt_yesno", "tt_gen"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    assert 0.0 <= results["results"]["tt_yesno"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["tt_gen"]
