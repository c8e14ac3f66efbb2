"""What every attack shares: behaviours, budgets, the policy under attack, compute accounting, and the
``Attack`` protocol the runner drives.

An attack turns one ``Behaviour`` (a harmful goal and a target answer prefix) into one or more
``Attempt``s: the exact prompt ids the model will be given (the chat template's own ids plus safely
encoded text, or token-level suffixes chosen from ``Policy.allowed_ids``) and, for prefilling, the
assistant-turn ids the attacker placed. The runner then generates from each attempt through the
backtracking decoder (``bt_ray.eval.engines``), post-processes with ``bt_ray.reset`` and judges the
*shown* answer. Attacks never decide success themselves, and never place a special id (``[RESET]``
included) anywhere they control: ``Policy.allowed_ids`` excludes them and ``check_attempt`` verifies it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Behaviour:
    """One thing the attacker wants the model to do.

    Attributes:
        id: stable id (results are keyed and resumed by it).
        goal: the harmful request (the user turn).
        target: the start of a compliant answer the attacker steers towards ("Sure, here is ...").
        cluster: unit for cluster-aware intervals (the synthetic world's template|task; else the id).
        location: where it came from (file and row), for error messages.
    """

    id: str
    goal: str
    target: str
    cluster: str
    location: str


@dataclass(frozen=True, slots=True)
class Budget:
    """How much one behaviour may cost: optimisation steps and wall time, whichever ends first."""

    max_steps: int
    max_seconds: float

    def exhausted(self, steps: int, start: float) -> bool:
        return steps >= self.max_steps or time.perf_counter() - start >= self.max_seconds


@dataclass(slots=True)
class Compute:
    """Compute one behaviour used: steps, seconds, and sequences passed forward and backward."""

    steps: int = 0
    seconds: float = 0.0
    forward: int = 0
    backward: int = 0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "forward": self.forward,
                "backward": self.backward}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One input the attack hands to the model.

    Attributes:
        variant: which variant of the attack this is ("" for one attempt per behaviour; "k=5" for
            prefilling 5 target tokens).
        prompt_ids: the whole prompt, generation prompt (and any prefill) included.
        prefill_ids: the assistant-turn ids the attacker wrote (the end of ``prompt_ids``); they are
            part of the answer: the shown answer is computed over ``prefill_ids + generated``.
        placed_ids: every id the attack chose (suffix ids, its template's text ids, the prefill):
            ``check_attempt`` verifies none is special.
        adversarial_text: the readable adversarial part (a suffix, a template), for the report.
        best_loss: the attack's objective at the end (None for attacks without one).
        losses: the objective after each step.
        compute: what the search cost.
    """

    variant: str
    prompt_ids: list[int]
    prefill_ids: list[int] = field(default_factory=list)
    placed_ids: list[int] = field(default_factory=list)
    adversarial_text: str = ""
    best_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    compute: Compute = field(default_factory=Compute)


@dataclass
class Policy:
    """The model under attack, as the attacks need it.

    Attributes:
        model: the HF model (attacks take gradients through it; eval-only attacks just run it).
        tokenizer: its tokenizer, ``[RESET]`` registered.
        reset_id: the ``[RESET]`` id.
        stop_ids: ids that end an answer.
        generator: an ``HFGenerator`` over the same model (greedy checks, the final generation).
        allowed_ids: ids an attack may place: every id but special/added tokens (``[RESET]``, the chat
            template's markers, EOS, padding).
        decode: how the runner (and an attack's periodic checks) generate: the backtracking decoder.
        is_unsafe: the configured judge on ``(goal, shown answer)``; attacks may stop early on success.
    """

    model: object
    tokenizer: object
    reset_id: int
    stop_ids: tuple[int, ...]
    generator: object
    allowed_ids: list[int]
    decode: object = None
    is_unsafe: Callable[[str, str], bool] | None = None

    def generate_shown(self, prompt_ids: list[int], prefill_ids: list[int] = (), seed: int = 0):
        """Generate from ``prompt_ids`` through the backtracking decoder; returns ``(output, shown text)``
        where the output (``BacktrackOutput``) covers ``prefill_ids + generated``."""
        from bt_ray.reset import backtrack_output, shown_text

        generation = self.generator.generate([list(prompt_ids)], self.decode, [seed])[0]
        out = backtrack_output([*prefill_ids, *generation.ids], self.reset_id, self.stop_ids)
        return out, shown_text(self.tokenizer, out)

    @classmethod
    def load(cls, model_cfg, engine_cfg=None, decode=None, is_unsafe=None) -> Policy:
        from bt_ray.eval.engines import HFGenerator

        generator = HFGenerator.from_cfg(model_cfg, engine_cfg)
        tokenizer = generator.tokenizer
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        vocab = generator.model.get_input_embeddings().weight.shape[0]
        allowed = [i for i in range(min(vocab, len(tokenizer))) if i not in special]
        if decode is None:
            from bt_ray.eval.config import DecodeCfg

            decode = DecodeCfg()
        return cls(model=generator.model, tokenizer=tokenizer, reset_id=generator.reset_id,
                   stop_ids=generator.stop_ids, generator=generator, allowed_ids=allowed, decode=decode,
                   is_unsafe=is_unsafe)


Progress = Callable[[dict], None]
"""Called by an attack after each step with e.g. ``{"step": 3, "loss": 1.2}`` (live progress)."""


class Attack(Protocol):
    """Anything that turns a behaviour into attempts against a policy, within a budget."""

    kind: str

    def attack(self, policy: Policy, behaviour: Behaviour, budget: Budget,
               progress: Progress) -> list[Attempt]:
        """The attempts for ``behaviour`` (the runner generates from and judges each one)."""
        ...


def check_attempt(policy: Policy, attempt: Attempt) -> None:
    """Raise if an attack placed a special id (``[RESET]`` included): every id it chose must be an
    allowed id, and ``[RESET]`` must not occur anywhere in the prompt."""
    allowed = set(policy.allowed_ids)
    placed = sorted({i for i in [*attempt.placed_ids, *attempt.prefill_ids] if i not in allowed})
    if placed or policy.reset_id in attempt.prompt_ids:
        raise AssertionError(f"attack attempt {attempt.variant!r} placed special ids {placed} "
                             f"(the [RESET] id is {policy.reset_id})")
