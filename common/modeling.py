"""Tokenizer and model loading, plus the builders of the tiny demo policy.

A user's model goes through ``load_tokenizer`` / ``load_model`` from a local
directory (``model.path``). The demo policy takes exactly the same path: its
tokenizer is trained with the ``tokenizers`` library, its Qwen2 model is built
from a config, and both are saved with ``save_pretrained`` first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# Protocol tags are atomic tokens in the demo tokenizer (a real model's BPE just splits them).
TAG_TOKENS = [
    "<reasoning>", "</reasoning>", "<tool>", "</tool>", "<result>", "</result>",
    "<answer>", "</answer>", "<search>", "</search>", "<information>", "</information>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str | Path) -> Path:
    """Fail early (before Ray starts), naming the file and what was expected.

    Checks that ``config.json`` and the tokenizer's JSON files parse, and that every
    ``*.safetensors`` file has a valid header whose tensors fit in the file (a truncated
    download fails here, not inside an actor). Nothing is unpickled.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model.path {str(p)!r} is not a directory (expected a Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(p)!r} has no config.json (expected save_pretrained output)")
    config = _read_json(p / "config.json", "a Hugging Face model config")
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise ValueError(f"{str(p / 'config.json')!r}: no model_type or architectures (expected save_pretrained output)")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"model directory {str(p)!r} has no weights (*.safetensors; pickled *.bin is not loaded)")
    for w in weights:
        check_safetensors(w)
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"model directory {str(p)!r} has no tokenizer files (tokenizer.json)")
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
        if (p / name).is_file():
            _read_json(p / name, "JSON written by save_pretrained")
    return p


def _read_json(path: Path, expected: str):
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); expected {expected}") from None


def check_safetensors(path: str | Path) -> None:
    """ValueError naming ``path`` unless it is a complete safetensors file (header parses, data fits)."""
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(path)!r} is {size} bytes: empty or truncated (expected a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError(f"{str(path)!r}: header length {n} does not fit the file ({size} bytes): truncated or "
                             "not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(path)!r}: unreadable safetensors header ({e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{str(path)!r} is truncated: its tensors need {8 + n + max(ends)} bytes, the file has {size}")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], local_files_only=True, use_safetensors=True
    )
    return model


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE in which whitespace and punctuation are tokens of their own.

    Isolating spaces and punctuation makes a name tokenise identically wherever it
    appears (after a space in the question, after a quote in the JSON query, at the
    start of an article), which the policy needs to learn to copy names.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
    )
    tok.add_tokens(TAG_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


def build_demo_model(vocab_size: int, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 384, max_positions: int = 768, seed: int = 0):
    """A small Qwen2-architecture causal LM built from a config (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    return Qwen2ForCausalLM(cfg)


def special_token_strings(tokenizer) -> set[str]:
    """Every string the tokenizer turns into a special token: the named ones and added tokens flagged special."""
    out = set(getattr(tokenizer, "all_special_tokens", []))
    out.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return out


def scrub_special_tokens(tokenizer, text: str) -> str:
    """Break up the tokenizer's special-token strings in env text (a zero-width space after the first
    character), so ``<|im_start|>`` inside a retrieved passage or an error message tokenises as plain
    text and cannot open a fake chat turn. Only env text goes through here, never the model's tokens."""
    for tok in special_token_strings(tokenizer):
        if len(tok) > 1 and tok in text:
            text = text.replace(tok, tok[0] + "\u200b" + tok[1:])
    return text


def observation_glue(tokenizer, messages: list[dict], action_text: str, observation_text: str,
                     action_ended_with_eos: bool) -> str:
    """Text the chat template puts between an assistant action and the next assistant turn.

    Derived from the model's own chat template, so it works for any chat model:
    render the conversation with the observation appended and keep what follows
    the action. Only env/template text is tokenised here; the model's action
    tokens are never re-tokenised.
    """
    convo = list(messages) + [{"role": "assistant", "content": action_text}]
    full = tokenizer.apply_chat_template(
        convo + [{"role": "user", "content": observation_text}], tokenize=False, add_generation_prompt=True
    )
    idx = full.rfind(action_text, 0, len(full) - len(observation_text)) if action_text else -1
    if idx < 0:  # template rewrote the content: fall back to the generic ChatML glue
        glue = f"<|im_end|>\n<|im_start|>user\n{observation_text}<|im_end|>\n<|im_start|>assistant\n"
    else:
        glue = full[idx + len(action_text):]
    eos = tokenizer.eos_token or ""
    if action_ended_with_eos and eos and glue.startswith(eos):
        glue = glue[len(eos):]
    return glue
