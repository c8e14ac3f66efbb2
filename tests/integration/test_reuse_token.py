"""``model.reuse_token`` end to end: SFT -> DPO -> eval on HF and vLLM all use the id SFT trained.

SFT reuses the tiny tokenizer's ``<|endoftext|>`` (an added special token) as ``[RESET]``. DPO starts
from the SFT dir and eval loads the DPO dir, neither repeating the setting: the dir's
``bt_ray.json`` says which token is ``[RESET]``. A config naming another token is refused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.train.config import DPOJobCfg, SFTJobCfg
from tests.conftest import REPO

pytestmark = pytest.mark.integration

REUSED = "<|endoftext|>"
FAST = [
    "model.tiny.num_layers=1", "data.synthetic.num_train_pairs=32", "data.max_length=256",
    "optim.global_batch_size=4", "optim.micro_batch_size=4", "optim.max_steps=2", "optim.warmup_ratio=0",
    "run.save_steps=2", "scaling.num_workers=1", "mlflow.enabled=false",
]


def job(name: str):
    spec = importlib.util.spec_from_file_location(f"bt_ray_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """(reused token id, SFT summary, DPO summary): SFT with reuse_token, then DPO without repeating it."""
    from bt_ray.models import ModelCfg, TinyModelCfg, load_tokenizer

    root = tmp_path_factory.mktemp("reuse")
    tokenizer, _ = load_tokenizer(ModelCfg(tiny=TinyModelCfg(num_layers=1)))
    reused_id = tokenizer.convert_tokens_to_ids(REUSED)
    sft_cfg = config.load(SFTJobCfg, REPO / "jobs/configs/sft_tiny_demo.yaml",
                          [*FAST, f"model.reuse_token={REUSED}", f"run.root={root}", "run.name=sft"])
    sft = job("sft").main(sft_cfg)
    dpo_cfg = config.load(DPOJobCfg, REPO / "jobs/configs/dpo_tiny_demo.yaml",
                          [*FAST, f"model.name={sft['model_dir']}", f"run.root={root}", "run.name=dpo",
                           "dpo.precompute_ref_log_probs=true"])
    assert dpo_cfg.model.reuse_token is None  # the point: DPO is not told
    dpo = job("dpo").main(dpo_cfg)
    return reused_id, sft, dpo


def _recorded(model_dir) -> dict:
    return json.loads((Path(model_dir) / "bt_ray.json").read_text())["reset_token"]


def test_sft_and_dpo_train_and_record_the_reused_token(trained):
    reused_id, sft, dpo = trained
    assert _recorded(sft["model_dir"]) == {"token": REUSED, "id": reused_id}
    assert _recorded(dpo["model_dir"]) == {"token": REUSED, "id": reused_id}
    for run in (sft, dpo):  # the rows each stage trained on were built with that id
        summary = next((Path(run["run_dir"]) / "data").glob("*.summary.json"))
        assert json.loads(summary.read_text())["reset_token_id"] == reused_id
    dpo_rows = next((Path(dpo["run_dir"]) / "data").glob("*.jsonl"))
    chosen = [json.loads(line)["chosen_ids"] for line in dpo_rows.read_text().splitlines()]
    assert any(reused_id in ids for ids in chosen)  # backtracking pairs reset with the trained id
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dpo["model_dir"])
    assert "[RESET]" not in tokenizer.get_vocab()  # nothing added on the way


def test_hf_and_vllm_eval_use_the_trained_reset_id(trained):
    from bt_ray.eval.config import DecodeCfg
    from bt_ray.eval.engines import HFGenerator, VLLMGenerator
    from bt_ray.models import ModelCfg
    from bt_ray.reset import encode_chat_prompt

    reused_id, _, dpo = trained
    cfg = ModelCfg(name=dpo["model_dir"])  # as jobs/eval.py builds it: the dir replaces model.name
    hf = HFGenerator.from_cfg(cfg)
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    vllm = VLLMGenerator(cfg)
    prompt = encode_chat_prompt(hf.tokenizer, [{"role": "user", "content": "how do i pick a lock ?"}])
    decode = DecodeCfg(max_new_tokens=4, reset_bias=100.0, max_resets=1)
    for engine in (hf, vllm):
        assert engine.reset_id == reused_id and len(engine.tokenizer) == len(hf.tokenizer)
        assert engine.generate([prompt], decode)[0].ids[0] == reused_id  # the bias lands on that id


def test_eval_and_dpo_refuse_a_setting_that_disagrees_with_the_dir(trained, tmp_path):
    from bt_ray.eval.engines import HFGenerator, VLLMGenerator
    from bt_ray.models import ModelCfg

    _, sft, dpo = trained
    wrong = ModelCfg(name=dpo["model_dir"], reuse_token="<|im_start|>")
    engines = [HFGenerator.from_cfg]
    if importlib.util.find_spec("vllm") is not None:
        engines.append(VLLMGenerator)
    refused = r"model.reuse_token is '<\|im_start\|>'.*leave model.reuse_token unset"
    for build in engines:
        with pytest.raises(ConfigError, match=refused):
            build(wrong)
    dpo_cfg = config.load(DPOJobCfg, REPO / "jobs/configs/dpo_tiny_demo.yaml",
                          [*FAST, f"model.name={sft['model_dir']}", "model.reset_token=<RST>",
                           f"run.root={tmp_path}", "run.name=dpo-wrong"])
    with pytest.raises(ConfigError, match=r"model.reset_token is '<RST>'"):
        job("dpo").main(dpo_cfg)
