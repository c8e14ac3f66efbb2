"""The vLLM V1 side of ``[RESET]`` decoding: a logits processor that caps a request's resets.

Its own module because it imports vLLM at the top: ``bt_ray.reset`` (the one door to ``[RESET]``
semantics) serves ``VllmResetLimitProcessor`` from here only when asked for, so importing it never
imports vLLM, and vLLM (and pickling by reference) finds the class by its qualified name.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from bt_ray.reset import VLLM_MAX_RESETS_ARG, VLLM_RESET_ID_ARG


class VllmResetLimitProcessor(LogitsProcessor):
    """vLLM V1 processor: ``[RESET]`` logit -> -inf once a request has ``max_resets`` resets.

    Registered engine-wide (``LLM(logits_processors=[...])``); a request opts in through
    ``SamplingParams(extra_args=vllm_sampling_extra_args(...))``. The bias itself travels as
    vLLM's standard ``logit_bias``, so the OpenAI API carries it too.
    """

    @classmethod
    def validate_params(cls, sampling_params):
        # A bad argument must fail the request, not the engine (EngineDeadError otherwise).
        args = sampling_params.extra_args or {}
        if VLLM_MAX_RESETS_ARG in args or VLLM_RESET_ID_ARG in args:
            n, rid = args.get(VLLM_MAX_RESETS_ARG), args.get(VLLM_RESET_ID_ARG)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"extra_args.{VLLM_MAX_RESETS_ARG} must be an int >= 0; got {n!r}")
            if not isinstance(rid, int) or rid < 0:
                raise ValueError(f"extra_args.{VLLM_RESET_ID_ARG} must be a token id; got {rid!r}")

    def __init__(self, vllm_config, device, is_pin_memory):
        # batch index -> [reset id, max resets, live reference to the request's output ids,
        #                 ids already scanned, resets seen]: each step scans only the new ids.
        self._requests: dict[int, list] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._requests.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            args = (params.extra_args or {}) if params is not None else {}
            if VLLM_MAX_RESETS_ARG in args:
                reset_id, max_resets = args[VLLM_RESET_ID_ARG], args[VLLM_MAX_RESETS_ARG]
                self._requests[index] = [reset_id, max_resets, output_ids, 0, 0]
            else:
                self._requests.pop(index, None)
        for a, b, direction in batch_update.moved:
            state_a, state_b = self._requests.pop(a, None), self._requests.pop(b, None)
            if state_a is not None:
                self._requests[b] = state_a
            if state_b is not None and direction == MoveDirectionality.SWAP:
                self._requests[a] = state_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, cols = [], []
        for index, state in self._requests.items():
            reset_id, max_resets, output_ids, num_seen, num_resets = state
            if len(output_ids) > num_seen:
                num_resets += output_ids[num_seen:].count(reset_id)
                state[3], state[4] = len(output_ids), num_resets
            if num_resets >= max_resets:
                rows.append(index)
                cols.append(reset_id)
        if rows:
            logits[rows, cols] = float("-inf")
        return logits
