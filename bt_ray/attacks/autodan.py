"""AutoDAN (Liu et al., 2023; PAPER.md section 7): a genetic algorithm over readable jailbreak templates.

Each candidate is a template, plain prose with a ``{goal}`` placeholder; the user turn is the template
with the behaviour's goal filled in. The search keeps the population's best few unchanged (elitism),
draws parents in proportion to their fitness, crosses two parents over at sentence boundaries and
mutates single words (swapping in words the seed templates use, so candidates stay readable). Fitness
is the likelihood of the behaviour's target answer after the chat prompt: the negative mean cross
entropy of ``encode_text(target)`` given ``encode_chat_prompt([user: candidate])``, computed for a
batch of candidates in one forward pass.

The seeds are versioned data (``data/autodan_seeds.jsonl``: one ``{"id", "version", "template"}``
object per line). HarmBench's AutoDAN also rewrites candidates with an LLM; here mutation is word-level
only, so the search needs no second model. Template text is always encoded with ``encode_text``, so a
literal ``[RESET]`` could never become the control token; the loader still rejects templates holding
special-token text, so the data says what it means.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bt_ray.attacks.core import Attempt, Behaviour, Budget, Compute, Policy, Progress
from bt_ray.config import ConfigError, check
from bt_ray.reset import RESET_TOKEN, chat_prompt_parts, control_strings, encode_chat_prompt, encode_text

SEEDS_PATH = Path(__file__).parent / "data" / "autodan_seeds.jsonl"
"""The packaged seed templates."""
GOAL = "{goal}"
"""Where a template puts the behaviour's goal."""

# Special-token text of common chat formats, rejected in seeds whatever the model (a tokenizer's own
# special tokens are checked too when one is given).
_SPECIAL_TEXT = re.compile(
    r"<\|[^|<>\s]{1,64}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<(?:bos|eos|pad|unk)>"
)
# Sentence units: text up to and including the whitespace after ., ! or ?, or a line break.
_SENTENCE = re.compile(r".*?(?:[.!?](?:\s+|$)|\n+|$)", re.S)
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoDANCfg:
    """The genetic search (defaults: HarmBench's AutoDAN, ~100 generations of 64 templates)."""

    num_generations: int = 100
    """Generations at most (a step of the budget is one generation; the budget may end it sooner)."""
    population: int = 64
    """Candidate templates per generation."""
    num_elites: int = 3
    """Best candidates copied unchanged into the next generation (HarmBench: 5% of 64)."""
    crossover_rate: float = 0.5
    """Probability that a pair of parents is crossed over (else both pass on as they are)."""
    num_crossover_points: int = 5
    """Sentence boundaries at which a crossover switches parent, at most."""
    mutation_rate: float = 0.01
    """Probability that each word of a child is replaced by a word from the seed templates."""
    seeds_path: str | None = None
    """JSONL seed templates (id, version, template with {goal}); null: the packaged file."""
    seed: int = 0
    """Seed of the search's random choices (combined with the behaviour id)."""
    batch_size: int = 16
    """Candidates per forward pass when computing fitness."""
    check_every: int = 5
    """Every this many generations the best candidate's greedy answer is judged; unsafe stops the search
    early (0: never; needs ``Policy.is_unsafe``)."""

    def __post_init__(self):
        check(self, [
            ("num_generations", self.num_generations >= 1, "must be >= 1"),
            ("population", self.population >= 2, "must be >= 2"),
            ("num_elites", 0 <= self.num_elites < self.population, "must be in [0, population)"),
            ("crossover_rate", 0.0 <= self.crossover_rate <= 1.0, "must be in [0, 1]"),
            ("num_crossover_points", self.num_crossover_points >= 1, "must be >= 1"),
            ("mutation_rate", 0.0 <= self.mutation_rate <= 1.0, "must be in [0, 1]"),
            ("seeds_path", self.seeds_path is None or bool(self.seeds_path), "must be a path or null"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("check_every", self.check_every >= 0, "must be >= 0 (0: never)"),
        ])


@dataclass(frozen=True, slots=True)
class SeedTemplate:
    """One seed template: ``id`` and ``version`` name it in reports, ``location`` is file:line."""

    id: str
    version: int
    template: str
    location: str


def load_seeds(path: str | Path | None = None, tokenizer=None) -> list[SeedTemplate]:
    """Read and check a seed file; every problem is reported at once, each as ``file:line: ...``.

    A line must be a JSON object with exactly ``id`` (a unique non-empty string), ``version`` (an int
    >= 1) and ``template`` (text holding ``{goal}`` and no special-token text: ``[RESET]``, chat
    markers, and the tokenizer's own special tokens when one is given). Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: one line per problem.
    """
    path = Path(path) if path is not None else SEEDS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"AutoDAN seed file not found: {path}")
    special = [RESET_TOKEN, *(control_strings(tokenizer) if tokenizer is not None else [])]
    seeds, errors, seen = [], [], {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            errors.append(f"{where}: must be a JSON object with id, version and template")
            continue
        problems = []
        if set(row) != {"id", "version", "template"}:
            problems.append(f"must have exactly the keys id, version, template; got {sorted(row)}")
        sid, version, template = row.get("id"), row.get("version"), row.get("template")
        if not isinstance(sid, str) or not sid:
            problems.append(f"id must be a non-empty string; got {sid!r}")
        elif sid in seen:
            problems.append(f"id {sid!r} repeats line {seen[sid]}")
        else:
            seen[sid] = number
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            problems.append(f"version must be an integer >= 1; got {version!r}")
        if not isinstance(template, str):
            problems.append(f"template must be a string; got {template!r}")
        else:
            if GOAL not in template:
                problems.append(f"template must contain the {GOAL} placeholder")
            found = sorted({s for s in special if s in template} | set(_SPECIAL_TEXT.findall(template)))
            if found:
                problems.append(f"template must not contain special-token text; found {found}")
        errors += [f"{where}: {p}" for p in problems]
        if not problems:
            seeds.append(SeedTemplate(sid, version, template, where))
    if not seeds and not errors:
        errors.append(f"{path}: no seed templates")
    if errors:
        raise ConfigError(errors, header=f"bad AutoDAN seed file {path}")
    return seeds


# ---------------------------------------------------------------- fitness


@torch.no_grad()
def target_losses(model, prompts: list[list[int]], target_ids: list[int], *, batch_size: int,
                  pad_id: int = 0) -> list[float]:
    """Mean cross entropy of ``target_ids`` after each prompt, ``batch_size`` prompts per forward pass.

    Rows are left-padded so that every row's target sits at the same (last) positions: the model then
    computes logits for those ``T + 1`` positions only (``logits_to_keep``), not for the whole
    vocabulary at every prompt position. Position ids count from each row's first real token, so a
    padded row sees the positions it would alone.
    """
    if not target_ids:
        raise ValueError("the behaviour's target encodes to no tokens; the fitness needs a target")
    device = model.device
    T = len(target_ids)
    target_T = torch.tensor(target_ids, dtype=torch.long, device=device)
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [[*p, *target_ids] for p in prompts[i : i + batch_size]]
        width = max(len(r) for r in rows)
        input_ids_BL = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids_BL[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask_BL[b, width - len(r) :] = 1
        position_ids_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        logits_BTV = model(input_ids=input_ids_BL.to(device), attention_mask=mask_BL.to(device),
                           position_ids=position_ids_BL.to(device), logits_to_keep=T + 1,
                           use_cache=False).logits[:, :-1].float()
        ce_BT = torch.nn.functional.cross_entropy(
            logits_BTV.transpose(1, 2), target_T.expand(len(rows), T), reduction="none")
        out += ce_BT.mean(-1).tolist()
    return out


def user_prompt(tokenizer, template: str, goal: str) -> list[int]:
    """The chat prompt (generation prompt included) whose user turn is ``template`` with ``goal``."""
    return encode_chat_prompt(tokenizer, [{"role": "user", "content": template.replace(GOAL, goal)}])


# ---------------------------------------------------------------- genetic operators


def sentences(text: str) -> list[str]:
    """``text`` cut after each sentence end and line break; ``"".join(sentences(t)) == t``."""
    return [s for s in _SENTENCE.findall(text) if s]


def crossover(a: str, b: str, num_points: int, rng: random.Random) -> tuple[str, str]:
    """Two children of ``a`` and ``b`` that switch parent at up to ``num_points`` sentence boundaries.

    A child without ``{goal}`` (the placeholder's sentence came from neither parent) is replaced by its
    first parent, so every candidate keeps the goal.
    """
    sa, sb = sentences(a), sentences(b)
    boundaries = min(len(sa), len(sb)) - 1
    if boundaries < 1:
        return a, b
    points = sorted(rng.sample(range(1, boundaries + 1), min(num_points, boundaries)))
    c1, c2, last, swap = [], [], 0, False
    for p in [*points, None]:
        x, y = (sb, sa) if swap else (sa, sb)
        c1 += x[last:p]
        c2 += y[last:p]
        last, swap = p, not swap
    child1, child2 = "".join(c1), "".join(c2)
    return (child1 if GOAL in child1 else a), (child2 if GOAL in child2 else b)


def mutate(text: str, words: list[str], rate: float, rng: random.Random) -> str:
    """Replace each word of ``text`` with probability ``rate`` by one of ``words`` (keeping a capital);
    the ``{goal}`` placeholder is never touched."""
    if rate <= 0 or not words:
        return text

    def swap(m: re.Match) -> str:
        if rng.random() >= rate:
            return m.group()
        word = rng.choice(words)
        return word.capitalize() if m.group()[0].isupper() else word

    return GOAL.join(_WORD.sub(swap, piece) for piece in text.split(GOAL))


def word_pool(templates: list[str]) -> list[str]:
    """The distinct lower-case words (3+ letters) of the seed templates, sorted (deterministic)."""
    return sorted({w.lower() for t in templates for w in _WORD.findall(t.replace(GOAL, " ")) if len(w) >= 3})


# ---------------------------------------------------------------- the attack


class AutoDANAttack:
    """AutoDAN's genetic search; one ``Attempt`` (variant "") per behaviour: the best template found."""

    kind = "autodan"

    def __init__(self, cfg: AutoDANCfg | None = None):
        self.cfg = cfg or AutoDANCfg()
        # Read now, so a broken seed file fails before any task starts.
        self.seeds = load_seeds(self.cfg.seeds_path)
        self.words = word_pool([s.template for s in self.seeds])

    def attack(self, policy: Policy, behaviour: Behaviour, budget: Budget,
               progress: Progress) -> list[Attempt]:
        start = time.perf_counter()
        cfg, tokenizer = self.cfg, policy.tokenizer
        load_seeds(self.cfg.seeds_path, tokenizer)  # this tokenizer's own special tokens, too
        rng = random.Random(f"{cfg.seed}:{behaviour.id}")
        target_ids = encode_text(tokenizer, behaviour.target)
        pad_id = getattr(policy.generator, "pad_id", None) or tokenizer.pad_token_id or 0
        compute = Compute()
        cache: dict[str, float] = {}  # template -> CE; elites and repeated children are not recomputed

        def evaluate(population: list[str]) -> list[float]:
            new = list(dict.fromkeys(t for t in population if t not in cache))
            if new:
                prompts = [user_prompt(tokenizer, t, behaviour.goal) for t in new]
                cache.update(zip(new, target_losses(policy.model, prompts, target_ids,
                                                    batch_size=cfg.batch_size, pad_id=pad_id)))
                compute.forward += len(new)
            return [cache[t] for t in population]

        population = self._initial_population(rng)
        scores = evaluate(population)
        best = min(range(len(population)), key=scores.__getitem__)
        best_text, best_loss = population[best], scores[best]  # the best ever (without elites, too)
        progress({"step": 0, "loss": best_loss, "best_loss": best_loss})
        losses: list[float] = []  # the best loss of each generation
        while compute.steps < cfg.num_generations and not budget.exhausted(compute.steps, start):
            population = self._next_generation(population, scores, rng)
            scores = evaluate(population)
            best = min(range(len(population)), key=scores.__getitem__)
            if scores[best] < best_loss:
                best_text, best_loss = population[best], scores[best]
            compute.steps += 1
            losses.append(scores[best])
            progress({"step": compute.steps, "loss": scores[best], "best_loss": best_loss})
            if policy.is_unsafe is not None and cfg.check_every and compute.steps % cfg.check_every == 0:
                compute.forward += 1  # one greedy generation
                if self._judged_unsafe(policy, best_text, behaviour.goal):
                    break
        before, content, after = chat_prompt_parts(
            tokenizer, [{"role": "user", "content": best_text.replace(GOAL, behaviour.goal)}])
        compute.seconds = time.perf_counter() - start
        return [Attempt(variant="", prompt_ids=[*before, *content, *after], placed_ids=list(content),
                        adversarial_text=best_text, best_loss=best_loss, losses=losses, compute=compute)]

    def _initial_population(self, rng: random.Random) -> list[str]:
        """Every seed (a random subset when there are more than ``population``), then mutated crossovers
        of random seed pairs until the population is full."""
        cfg, templates = self.cfg, [s.template for s in self.seeds]
        if len(templates) >= cfg.population:
            return rng.sample(templates, cfg.population)
        population = list(templates)
        while len(population) < cfg.population:
            a, b = rng.sample(templates, 2) if len(templates) > 1 else (templates[0], templates[0])
            child = crossover(a, b, cfg.num_crossover_points, rng)[0]
            population.append(mutate(child, self.words, cfg.mutation_rate, rng))
        return population

    def _next_generation(self, population: list[str], losses: list[float], rng: random.Random) -> list[str]:
        """Elites as they are, then children of parents drawn with weights softmax(-loss)."""
        cfg = self.cfg
        order = sorted(range(len(population)), key=losses.__getitem__)
        elites = [population[i] for i in order[: cfg.num_elites]]
        low = min(losses)
        weights = [math.exp(low - loss) for loss in losses]
        parents = rng.choices(population, weights=weights, k=cfg.population - len(elites))
        children: list[str] = []
        for i in range(0, len(parents), 2):
            a, b = parents[i], parents[(i + 1) % len(parents)]
            if rng.random() < cfg.crossover_rate:
                a, b = crossover(a, b, cfg.num_crossover_points, rng)
            children += [a, b]
        children = [mutate(c, self.words, cfg.mutation_rate, rng) for c in children[: len(parents)]]
        return elites + children

    @staticmethod
    def _judged_unsafe(policy: Policy, template: str, goal: str) -> bool:
        """The judge's verdict on the greedy, backtracking-decoded answer to ``template`` with ``goal``."""
        from bt_ray.eval.config import DecodeCfg

        decode = dataclasses.replace(policy.decode or DecodeCfg(), temperature=0.0)
        greedy = dataclasses.replace(policy, decode=decode)
        _, shown = greedy.generate_shown(user_prompt(policy.tokenizer, template, goal))
        return bool(policy.is_unsafe(goal, shown))
