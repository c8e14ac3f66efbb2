"""Generation with backtracking post-processing: the eval pipeline's first stage.

``generate_rows`` answers every user turn of a batch of rows (multi-turn rows are encoded with the
*shown* answers of their earlier turns), ``row_seed`` gives each row's turn its own sampling seed, and
``GenerateStage`` is the Ray Data actor that holds one ``Generator`` and runs ``generate_rows`` on
JSON rows (``bt_ray.eval.pipeline.run_pipeline`` wires it).
"""

from __future__ import annotations

import hashlib
import json
import time

from bt_ray import config
from bt_ray.eval.config import DecodeCfg, EngineCfg
from bt_ray.eval.engines import Generator
from bt_ray.models import ModelCfg
from bt_ray.reset import backtrack_output, encode_chat_prompt, raw_text, shown_text


def row_seed(seed: int, row: dict, turn: int) -> int:
    """The sampling seed of one row's turn: a hash of (seed, dataset, prompt, sample, turn).

    The same however rows are batched or sharded across actors, and distinct across rows, so
    samples are independent draws (a seed per batch position would repeat in every batch).
    """
    key = f"{seed}/{row['dataset']}/{row['prompt_index']}/{row['sample']}/{turn}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def generate_rows(
    generator: Generator, rows: list[dict], decode: DecodeCfg, *, max_prompt_tokens: int
) -> list[dict]:
    """Answer every user turn of every row, in order, with backtracking post-processing per turn.

    Turn t of a row is encoded with the *shown* answers of its earlier turns (what the user saw);
    all rows' turn t go through one batched generate call. The judged answer is the last turn's.
    Counts cover every turn: a needless reset in a greeting turn is a reset of the row.

    Returns:
        The rows with per-turn ``answers`` (shown) and ``raw_outputs``; the judged (last) turn's
        ``raw_output`` and ``shown_response``; ``reset`` (any turn reset), ``reset_last_turn``,
        ``num_resets``, ``num_discarded_tokens`` (all turns) and ``num_discarded_tokens_last_turn``;
        ``stopped`` (every turn ended with a stop id; False: some turn hit ``max_new_tokens``);
        ``empty_shown`` (the judged answer shows nothing: every judge calls that safe);
        ``num_output_tokens``; ``time_to_first_kept_token_s`` of the judged turn (None when it kept
        no token); ``generate_start``/``generate_end`` (epoch seconds); ``error``.
    """
    tok = generator.tokenizer
    out = [dict(r, answers=[], raw_outputs=[], num_output_tokens=0, num_discarded_tokens=0, num_resets=0,
                stopped=True, error=r.get("error")) for r in rows]
    for t in range(max((len(r["turns"]) for r in rows), default=0)):
        active, prompts = [], []
        for r in out:
            if r["error"] or t >= len(r["turns"]):
                continue
            try:
                if not r["turns"][t].strip():
                    raise ValueError(f"turn {t} of {r['location']} is empty")
                messages = []
                for u, a in zip(r["turns"][:t], r["answers"]):
                    messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                ids = encode_chat_prompt(tok, messages + [{"role": "user", "content": r["turns"][t]}])
                if len(ids) > max_prompt_tokens:
                    raise ValueError(f"prompt of {len(ids)} tokens exceeds engine.max_prompt_tokens="
                                     f"{max_prompt_tokens}")
            except Exception as e:  # noqa: BLE001 - the row records it, the run goes on
                r["error"] = f"encode: {type(e).__name__}: {e}"
                continue
            active.append(r)
            prompts.append(ids)
        if not active:
            continue
        seeds = [row_seed(decode.seed, r, t) for r in active]
        start = time.time()
        try:
            gens = generator.generate(prompts, decode, seeds)
        except Exception:  # noqa: BLE001 - find the failing rows one by one; the others still count
            gens = []
            for r, ids, seed in zip(active, prompts, seeds):
                try:
                    gens.append(generator.generate([ids], decode, [seed])[0])
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"generate: {type(e).__name__}: {e}"
                    gens.append(None)
        end = time.time()
        for r, g in zip(active, gens):
            if g is None:
                continue
            post = backtrack_output(g.ids, generator.reset_id, generator.stop_ids)
            shown = shown_text(tok, post)
            r["answers"].append(shown)
            r["raw_outputs"].append(raw_text(tok, post))
            r["num_output_tokens"] += len(g.ids)
            r["num_resets"] += post.num_resets
            r["num_discarded_tokens"] += post.num_discarded_tokens
            r["stopped"] = r["stopped"] and post.stopped
            r.setdefault("generate_start", start)
            r["generate_end"] = end
            if t == len(r["turns"]) - 1:  # the judged turn
                r["raw_output"] = r["raw_outputs"][-1]
                r["shown_response"] = shown
                r["reset_last_turn"] = post.did_reset
                r["num_discarded_tokens_last_turn"] = post.num_discarded_tokens
                r["empty_shown"] = not shown
                kept = post.first_kept_index < len(post.raw_ids)
                r["time_to_first_kept_token_s"] = g.token_times[post.first_kept_index] if kept else None
    for r in out:
        done = len(r["answers"]) == len(r["turns"]) and not r["error"]
        r["reset"] = r["num_resets"] > 0 if done else None
        if not done:  # an error row: its partial counts describe no answer
            r["stopped"] = None
    return out


class GenerateStage:
    """Ray Data actor: one generator at a time, batches of JSON rows in and out.

    ``passes`` maps a pass key (``row["pass"]``) to the model and decoding of its rows: one pipeline
    can evaluate several models and decodings (main table, worst-of-k, bias points) and pay the
    actors' start-up once. Rows come in pass order, so an actor moves from one model to the next
    (``switch_generator``: weights loaded in place on vLLM when the architecture is shared) once the
    batches of the previous model it holds are done. With several batches in flight per actor
    (``engine.batches_per_actor``), calls run in threads: ``_acquire`` lets calls of the loaded
    model in and holds the others until it is free to switch.
    """

    def __init__(self, passes: dict[str, dict], engine: dict):
        import threading

        self.engine = config.build(EngineCfg, engine)
        self.passes = {key: (config.build(ModelCfg, p["model"]), config.build(DecodeCfg, p["decode"]))
                       for key, p in passes.items()}
        self.generator: Generator | None = None
        self.loaded: ModelCfg | None = None
        self._users = 0
        self._cond = threading.Condition()
        first = next(iter(self.passes.values()))[0]  # load now: start-up is paid before the first batch
        self._switch(first)

    def _switch(self, model: ModelCfg) -> None:
        from bt_ray.eval.engines import switch_generator

        self.generator = switch_generator(self.generator, model, self.engine)
        self.loaded = model

    def _acquire(self, model: ModelCfg) -> Generator:
        with self._cond:
            while self.loaded != model and self._users > 0:
                self._cond.wait()
            if self.loaded != model:
                self._switch(model)
            self._users += 1
            return self.generator

    def _release(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(p) for p in batch["payload"]]
        done = []
        for key in dict.fromkeys(r["pass"] for r in rows):  # passes in the order they come
            model, decode = self.passes[key]
            generator = self._acquire(model)
            try:
                done += generate_rows(generator, [r for r in rows if r["pass"] == key], decode,
                                      max_prompt_tokens=self.engine.max_prompt_tokens)
            finally:
                self._release()
        return {"payload": [json.dumps(r) for r in done]}
