"""The vLLM logits processor that gives each request its own value models, weights and beta.

Pass it to vLLM: `--logits-processors transfertune.serving.vllm.mix_processor:ValueMixProcessor` (`transfertune
serve --engine vllm` does), or `LLM(export, logits_processors=[ValueMixProcessor])`. It changes no logits itself:
vLLM's model runner (V1, `v1/worker/gpu_model_runner.py`, which the CPU runner subclasses) calls `update_state`
once per step, after it has settled the batch and before the forward pass (`_update_states` ->
`InputBatch.refresh_metadata`), with the requests that joined (their `SamplingParams`), left and moved. This
processor keeps each batch index's weights and beta and publishes them for the step (value_mix.publish_step);
the model's `compute_logits`, whose rows are the batch's requests in that same order (`logits_indices =
query_start_loc[1:] - 1`), composes each row with its own (model.py). So the sampled tokens and the returned
log-probs (vLLM's default `raw_logprobs`, computed before logits processors run) are each request's
composition.

`validate_params` runs when a request is admitted (in the API server process) and refuses a malformed mix, a
name the export lacks (where the process knows the export's names: value_mix.known_exports) and prompt
log-probs with a mix (the runner computes those through compute_logits per request without saying which:
`_get_prompt_logprobs_dict`), with a 400.

This is the V1 runner's interface. vLLM 0.32 runs Model Runner V2 on GPUs by default, which takes processors of
another interface (`v1/worker/gpu/sample/logits_processor`) and refuses this one at start;
`VLLM_USE_V2_MODEL_RUNNER=0` selects the V1 runner (transfertune's launcher sets it). See docs/serving.md.
"""
from __future__ import annotations

import logging

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from transfertune.serving.vllm.export import BETA_OVERRIDE, META_KEY, WEIGHTS_OVERRIDE
from transfertune.serving.vllm.value_mix import (
    ExportMix,
    MixError,
    StepRows,
    check_known,
    parse_request,
    publish_step,
    register_names,
)

logger = logging.getLogger("vllm.transfertune")  # under vLLM's logger, so its handler prints it


def export_mix(hf_config) -> ExportMix | None:
    """The export's names and defaults from the config vLLM loaded (with its hf_overrides); None when the model
    is not a transfertune export."""
    meta = getattr(hf_config, META_KEY, None)
    if not isinstance(meta, dict) or not meta.get("values"):
        return None
    return ExportMix.from_meta(meta, beta=getattr(hf_config, BETA_OVERRIDE, None),
                               weights=getattr(hf_config, WEIGHTS_OVERRIDE, None))


class ValueMixProcessor(LogitsProcessor):
    """Per-request value models, weights and beta for a transfertune export (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            mix = parse_request(sampling_params.extra_args)
            if mix is None:
                return
            check_known(mix)
        except MixError as err:
            raise VLLMValidationError(str(err), parameter="vllm_xargs") from None
        if sampling_params.prompt_logprobs is not None:
            raise VLLMValidationError(
                "prompt log-probs (prompt_logprobs, or echo with logprobs) are computed with the export's default "
                "composition: vLLM's runner does not tell the model which request prompt rows belong to; leave out "
                "transfertune_value/_weights/_beta for them", parameter="prompt_logprobs")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.export = export_mix(vllm_config.model_config.hf_config)
        if self.export is None:
            raise ValueError(f"{type(self).__name__} composes the value models of a transfertune export "
                             f"(`transfertune export --engine vllm`); {vllm_config.model_config.model} is not one")
        register_names(self.export.names)
        self.key = vllm_config.instance_id
        self.rows: dict[int, tuple[tuple[float, ...], float]] = {}  # batch index -> (weights, beta), not default
        self.step: StepRows | None = None

    def is_argmax_invariant(self) -> bool:
        return True  # apply changes nothing: the composition happens in compute_logits

    def _row(self, params, _prompt_ids, _output_ids):
        try:
            mix = parse_request(params.extra_args)
            return None if mix is None else self.export.resolve(mix)
        except MixError as err:  # admitted where the API server did not know the export's names
            logger.warning("a request's value mix is not this export's (%s): it composes the default", err)
            return None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            process_dict_updates(self.rows, batch_update, self._row)
            self.step = self._step_rows(batch_update.batch_size)
        publish_step(self.key, self.step)

    def _step_rows(self, batch_size: int) -> StepRows | None:
        if not self.rows:
            return None
        n = len(self.export.names)
        weights = torch.tensor([self.export.weights], dtype=torch.float64).repeat(batch_size, 1)
        beta = torch.full((batch_size,), self.export.beta, dtype=torch.float64)
        for index, (row_weights, row_beta) in self.rows.items():
            if index >= batch_size:  # not after vLLM's condense(); a stale index must not stop the engine
                continue
            weights[index] = torch.tensor(row_weights, dtype=torch.float64).reshape(n)
            beta[index] = row_beta
        return StepRows(weights, beta)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
