"""Several models and decodings through one pipeline (``run_passes``): each pass's rows are exactly what
that model and decoding give alone, though the actor started once and moved from model to model
(weights reloaded in place on vLLM)."""

from __future__ import annotations

import importlib.util

import pytest

from bt_ray.eval.config import DecodeCfg, EngineCfg, EvalCfg, JudgeCfg
from bt_ray.eval.pipeline import Pass, expand, load_items, run_passes, run_pipeline
from bt_ray.models import ModelCfg

pytestmark = pytest.mark.integration

OUTPUT_KEYS = ("raw_outputs", "answers", "num_output_tokens", "num_resets", "unsafe", "error")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two fine-tunes of one base (the tiny preset, weights nudged by two seeds): same architecture."""
    import torch

    from bt_ray.models import load_model, save_model

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model, tok, _ = load_model(ModelCfg())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        path = save_model(model, tok, tmp_path_factory.mktemp(name), {"stage": "test"})
        out[name] = ModelCfg(name=str(path))
    return out


def _outputs(rows):
    return [{k: r.get(k) for k in OUTPUT_KEYS} for r in rows]


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_passes_in_one_pool_give_each_model_its_own_rows(ray_cluster, two_models, kind):
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    rows = expand(load_items(EvalCfg())[:12])
    # One batch in flight: fixed batches, so rows are bit-identical run to run (with several in flight,
    # which requests share a vLLM step varies, and near-tied greedy tokens with it; concurrency itself
    # is tested in test_vllm_engine.py). 12 rows per pass in batches of 4: no batch spans two passes.
    engine = EngineCfg(kind=kind, num_actors=1, batch_size=4, batches_per_actor=1,
                       vllm_kv_cache_memory_bytes=128 << 20)
    greedy = DecodeCfg(max_new_tokens=16)
    sampled = DecodeCfg(max_new_tokens=16, temperature=1.0, seed=3)
    a, b = two_models["a"], two_models["b"]
    judge = JudgeCfg()
    together = run_passes([Pass("a", a, greedy, rows), Pass("b", b, greedy, rows),
                           Pass("b-sampled", b, sampled, rows), Pass("a-again", a, greedy, rows)],
                          engine=engine, judge=judge)
    alone_a, _ = run_pipeline(rows, model=a, engine=engine, decode=greedy, judge=judge)
    alone_b, _ = run_pipeline(rows, model=b, engine=engine, decode=greedy, judge=judge)
    assert _outputs(alone_a) != _outputs(alone_b)  # the two models answer differently
    assert _outputs(together["a"][0]) == _outputs(alone_a)
    assert _outputs(together["b"][0]) == _outputs(alone_b)
    assert _outputs(together["a-again"][0]) == _outputs(alone_a)  # and back again
    assert _outputs(together["b-sampled"][0]) != _outputs(alone_b)  # its own decoding
    for key, (done, timing) in together.items():
        assert [r["index"] for r in done] == [r["index"] for r in rows], key
        assert "pass" not in done[0] and timing["generate_span_s"] > 0


def test_pass_keys_must_be_unique():
    rows = expand(load_items(EvalCfg())[:1])
    with pytest.raises(ValueError, match="pass keys must be unique"):
        run_passes([Pass("x", ModelCfg(), DecodeCfg(), rows)] * 2, engine=EngineCfg(), judge=JudgeCfg())
