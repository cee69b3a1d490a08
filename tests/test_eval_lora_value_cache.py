"""`transfertune eval` caches a LoRA value model like any other artifact, keyed on its LoRA settings: a LoRA value
directory holds adapters and transfertune.json but no config.json, and must not be trained again for every cell
that uses it (which also deleted the token map saved in it)."""
import json
from pathlib import Path

from transfertune.evaluation.config import EvalConfig
from transfertune.evaluation.runner import EvalRunner
from transfertune.training.recipe import ValueRecipe
from transfertune.vocab.token_map import VocabMap


def test_a_lora_value_model_trains_once_and_keeps_its_token_map(model_dir, other_tokenizer, yes_no_records,
                                                               tmp_path):
    source = model_dir("llama", hidden=32, seed=5)
    other = model_dir("llama", name="lora-cache-other-vocab", tok=other_tokenizer, seed=8)
    task = tmp_path / "yesno.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    cfg = EvalConfig(source=source, targets=[other], tasks=[str(task)], methods=["source+value", "target+value"],
                     kind="generation", eval_examples=4, value=ValueRecipe(lora=True, max_steps=2, augment=0),
                     batch_size=4, max_length=64, vocab_map="align", cache_dir=str(tmp_path / "eval"))
    runner = EvalRunner(cfg)
    runner.run()
    value_dir = runner.value_dir("yesno")
    assert not Path(value_dir, "config.json").exists()
    adapters = sorted(p for p in (tmp_path / "eval" / "artifacts").rglob("adapter_model.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in adapters}
    assert len(adapters) == 1
    assert [m.kind for m in VocabMap.saved(value_dir)] == ["align"]
    EvalRunner(cfg).value_dir("yesno")
    assert stamps == {p: p.stat().st_mtime_ns for p in
                      (tmp_path / "eval" / "artifacts").rglob("adapter_model.safetensors")}
    assert [m.kind for m in VocabMap.saved(value_dir)] == ["align"]


def test_the_lora_recipe_is_part_of_the_value_artifacts_key(model_dir, yes_no_records, tmp_path):
    """Runs that differ only in LoRA settings train different value models (not one cached for both)."""
    source = model_dir("llama", hidden=32, seed=5)
    task = tmp_path / "yesno.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))

    def value_dir(**lora) -> str:
        cfg = EvalConfig(source=source, targets=[source], tasks=[str(task)], methods=["source+value"],
                         kind="generation", value=ValueRecipe(max_steps=1, augment=0, **lora), batch_size=4,
                         max_length=64, cache_dir=str(tmp_path / "eval"))
        return EvalRunner(cfg).value_dir("yesno")

    full, lora, lora_full_head = value_dir(), value_dir(lora=True), value_dir(lora=True, lora_head="full")
    assert len({full, lora, lora_full_head}) == 3
    assert Path(full, "config.json").is_file() and Path(lora, "adapter_config.json").is_file()
    assert value_dir(lora=True) == lora
