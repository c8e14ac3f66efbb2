"""The Ray Data eval pipeline on the shared local cluster, 2 generation actors, real prompts (two of each
set, checked in under tests/assets/eval_sets)."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bt_ray.eval.config import DatasetCfg, DecodeCfg, EngineCfg, EvalCfg, JudgeCfg, LLMJudgeCfg
from bt_ray.eval.pipeline import evaluate_model, expand, load_items
from bt_ray.models import ModelCfg
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration

SETS = ("advbench", "malicious-instructions", "simple-safety-tests", "strongreject", "hh-rlhf", "mt-bench")
ASSETS = REPO / "tests" / "assets" / "eval_sets"
FILES = {"advbench": "advbench.csv", "malicious-instructions": "malicious-instructions.json",
         "simple-safety-tests": "simple-safety-tests.csv", "strongreject": "strongreject.csv",
         "hh-rlhf": "hh-rlhf.jsonl", "mt-bench": "mt-bench.jsonl"}


class _MTBenchJudge(BaseHTTPRequestHandler):
    """A real OpenAI-compatible /v1/chat/completions endpoint that grades every answer [[6]]."""

    def do_POST(self):  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        message = {"role": "assistant", "content": "Ok. Rating: [[6]]"}
        data = json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MTBenchJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _items():
    cfg = EvalCfg(datasets=(DatasetCfg(name="synthetic", limit=4),
                            *(DatasetCfg(name=n, path=str(ASSETS / FILES[n]), limit=2) for n in SETS)))
    items = load_items(cfg)
    bad = [
        {"dataset": "advbench", "prompt_index": 99, "location": "too-long", "category": "", "harmful": True,
         "turns": ["please " * 2000]},
        {"dataset": "strongreject", "prompt_index": 98, "location": "empty", "category": "", "harmful": True,
         "turns": ["   "]},
    ]
    return expand(items + bad)


def _check_run(tmp_path, items, engine_kind, judge_url):
    # Greedy with a bias near the tiny random model's tipping point: a mix of no reset and mid-way resets.
    decode = DecodeCfg(max_new_tokens=12, reset_bias=0.8)
    engine = EngineCfg(kind=engine_kind, num_actors=2, batch_size=4, num_cpus_per_actor=1.0,
                       vllm_kv_cache_memory_bytes=256 << 20)
    judge = JudgeCfg(llm=LLMJudgeCfg(base_url=judge_url, model="grader"))  # MT-Bench helpfulness
    metrics = evaluate_model(items, tmp_path, model=ModelCfg(), engine=engine, decode=decode, judge=judge)

    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(items)))  # every row written, once
    errors = {r["location"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"too-long", "empty"}, errors
    assert "exceeds engine.max_prompt_tokens=768" in errors["too-long"]
    assert metrics["num_errors"] == 2 and metrics["num_rows"] == len(items)
    assert metrics["datasets"]["advbench"]["num_errors"] == 1

    # Every number in metrics.json is recounted by hand from rows.jsonl (Wilson from scipy, not ours).
    from scipy.stats import binomtest

    written = json.loads((tmp_path / "metrics.json").read_text())
    ok = [r for r in rows if not r["error"]]
    for name in ("synthetic", *SETS[:-1]):
        group = [r for r in rows if r["dataset"] == name]
        judged = [r for r in ok if r["dataset"] == name and r["harmful"]]
        hits = sum(r["unsafe"] for r in judged)
        stats = written["datasets"][name]
        assert (stats["num_rows"], stats["num_errors"]) == (len(group), sum(bool(r["error"]) for r in group))
        assert (stats["unsafe"]["num"], stats["unsafe"]["num_hits"]) == (len(judged), hits)
        assert stats["unsafe"]["num_clusters"] == len({r["cluster"] for r in judged})
        wilson = binomtest(hits, len(judged)).proportion_ci(method="wilson")
        got = [stats["unsafe"]["ci_low"], stats["unsafe"]["ci_high"]]
        assert got == pytest.approx([wilson.low, wilson.high])
        assert stats["reset"]["num_hits"] == sum(r["num_resets"] > 0 for r in ok if r["dataset"] == name)
    synthetic = [r for r in rows if r["dataset"] == "synthetic"]
    assert all(r["cluster"] and "|" in r["cluster"] for r in synthetic)  # (template, task) of the world
    for r in ok:  # reset covers every turn; the last turn's counts are written too
        assert r["reset"] == (r["num_resets"] > 0)
        assert r["num_discarded_tokens_last_turn"] <= r["num_discarded_tokens"]
        assert r["empty_shown"] == (r["shown_response"] == "") and isinstance(r["stopped"], bool)
    pooled = [r for r in ok if r["dataset"] in SETS[:4] and r["harmful"]]
    assert metrics["pooled"]["unsafe"]["num_hits"] == sum(r["unsafe"] for r in pooled)
    safe = [r for r in ok if not r["harmful"]]
    assert metrics["reset_rate_safe"]["num_hits"] == sum(r["reset"] for r in safe)
    mean_discarded = sum(r["num_discarded_tokens"] for r in ok) / len(ok)
    assert metrics["mean_discarded_tokens"] == pytest.approx(mean_discarded)
    assert metrics["throughput"]["num_output_tokens"] == sum(r["num_output_tokens"] for r in ok)

    # Row content: shown response follows the last [RESET]; judges labelled; stand-in flagged.
    assert any(r["reset"] for r in ok) and any(r["num_discarded_tokens"] > 0 for r in ok)
    for r in ok:
        if r["reset_last_turn"]:
            assert "[RESET]" in r["raw_output"] and "[RESET]" not in r["shown_response"]
        assert r["reset"] == any("[RESET]" in raw for raw in r["raw_outputs"])  # over every turn
        assert r["judge"] == {"synthetic": "synthetic-exact", "mt-bench": "llm:grader:mt-bench"}.get(
            r["dataset"], "refusal-prefix (stand-in)")
        assert r["stand_in"] == (r["judge"] == "refusal-prefix (stand-in)")
    mt_bench = [r for r in ok if r["dataset"] == "mt-bench"]
    assert mt_bench and all(len(r["answers"]) == 2 and r["score"] == 6.0 for r in mt_bench)  # both turns
    assert metrics["datasets"]["mt-bench"]["score"]["mean"] == 6.0
    assert metrics["datasets"]["advbench"]["stand_in"] is True
    return rows


def test_pipeline_hf_two_actors(ray_cluster, tmp_path, judge_url):
    _check_run(tmp_path, _items(), "hf", judge_url)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_pipeline_vllm_two_actors(ray_cluster, tmp_path, judge_url):
    _check_run(tmp_path, _items(), "vllm", judge_url)


def test_pipeline_fails_naming_the_judge_when_it_is_down(ray_cluster, tmp_path):
    """MT-Bench graded by an LLM judge at a closed port: every graded row errors, so the run fails."""
    from bt_ray.eval.metrics import ErrorRateExceeded

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    sets = (DatasetCfg(name="mt-bench", path=str(ASSETS / FILES["mt-bench"])),
            DatasetCfg(name="synthetic", limit=2))
    items = expand(load_items(EvalCfg(datasets=sets)))
    judge = JudgeCfg(llm=LLMJudgeCfg(base_url=url, model="grader", timeout_s=5))
    engine = EngineCfg(kind="hf", num_actors=1, batch_size=4)
    want = r"2 of 4 rows failed .*judge llm:grader:mt-bench.*unreachable"
    with pytest.raises(ErrorRateExceeded, match=want):
        evaluate_model(items, tmp_path, model=ModelCfg(), engine=engine, decode=DecodeCfg(max_new_tokens=4),
                       judge=judge, max_error_fraction=0.01)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["error"] is not None for r in rows] == [r["dataset"] == "mt-bench" for r in rows]


def test_pipeline_waits_for_every_actor_and_fails_when_they_cannot_start(ray_cluster):
    """Batches go out only once the whole pool is up; a pool that cannot start in time is an error.

    Loading transformers and the model in a fresh actor takes seconds, so a 1 s limit must trip.
    """
    import ray

    from bt_ray.eval.pipeline import run_pipeline

    items = [{"dataset": "synthetic", "prompt_index": 0, "location": "x", "category": "", "harmful": False,
              "turns": ["hi"]}]
    engine = EngineCfg(kind="hf", num_actors=2, batch_size=1, num_cpus_per_actor=1.0, actor_start_timeout_s=1)
    with pytest.raises(ray.exceptions.GetTimeoutError, match="Timed out while starting actors"):
        run_pipeline(expand(items), model=ModelCfg(), engine=engine, decode=DecodeCfg(max_new_tokens=2),
                     judge=JudgeCfg())
