"""Text in and out of the models: prompts to token ids, the ids that end a generation, the context window.
One home for the in-process engine, the router and the tools."""

from __future__ import annotations

from dataclasses import dataclass

from .models import load_tokenizer, resolve_model_dir


def encode_prompt(tokenizer, text: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt; with `chat`, `text` (or a message list) goes through the chat template."""
    if chat or isinstance(text, list):
        messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def eos_token_ids(tokenizer, *generation_configs) -> tuple[int, ...]:
    """The tokenizer's EOS plus every EOS the models' generation configs name (one home for both the
    in-process engine and the router)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for cfg in generation_configs:
        eos = getattr(cfg, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    return tuple(sorted(ids))


@dataclass(frozen=True)
class ModelText:
    """What serving needs of a target model besides its weights."""

    tokenizer: object
    eos_token_ids: tuple[int, ...]
    context_window: int  # prompt + generated tokens the model accepts

    def encode(self, text: str | list[dict], chat: bool) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat)


def load_model_text(spec: str) -> ModelText:
    """The tokenizer, EOS ids (tokenizer's and generation config's) and context window of a model."""
    from transformers import AutoConfig, GenerationConfig

    tokenizer = load_tokenizer(spec)
    path = resolve_model_dir(spec)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # a model directory without generation_config.json
        generation_config = None
    window = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 32768))
    return ModelText(tokenizer, eos_token_ids(tokenizer, generation_config), window)
