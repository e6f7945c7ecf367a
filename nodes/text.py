"""Text preprocessing: a prompt or chat messages become the token ids an LLM engine generates from."""

from __future__ import annotations

import asyncio
from typing import Any

from core.errors import InvalidField
from core.protocol import RequestContext, TokenizerOptions
from core.registry import engine_options_of
from nodes.base import Node


class TextPrompt(Node):
    """For text models whose engine takes token ids (it reads the engine's options:
    tokenizer, revision, context; :class:`core.protocol.TokenizerOptions`).
    Tokenizes ``input``/``prompt`` (a string) or ``messages`` (chat, through the tokenizer's
    chat template), and refuses prompts that do not fit the model's context (422 with both numbers).
    """

    requires = ("transformers",)
    engine_options = TokenizerOptions

    def __init__(self, kwargs, model) -> None:
        super().__init__(kwargs, model)
        self.tokenizer: Any = None  # a transformers tokenizer, once started
        self.options: TokenizerOptions = engine_options_of(model, TokenizerOptions)
        self.max_model_len: int | None = self.options.max_model_len

    async def start(self) -> None:
        self.tokenizer, context = await asyncio.to_thread(self._load)
        self.max_model_len = self.max_model_len or context

    def _load(self):
        from transformers import AutoConfig, AutoTokenizer

        from engines.checkpoints import resolve_source

        kw = self.options
        source = resolve_source(self.model.source)
        tokenizer = AutoTokenizer.from_pretrained(kw.tokenizer or source, revision=kw.revision,
                                                  trust_remote_code=kw.trust_remote_code)
        config = AutoConfig.from_pretrained(source, revision=kw.revision, trust_remote_code=kw.trust_remote_code)
        return tokenizer, getattr(config, "max_position_embeddings", None)

    def _tokens(self, payload: Any, model_id: str) -> list[int]:
        if isinstance(payload, str):
            if not payload:
                raise InvalidField("input: the prompt is empty", model_id=model_id, field="input")
            return self.tokenizer.encode(payload, add_special_tokens=True)
        if isinstance(payload, dict) and set(payload) == {"messages"}:
            messages = [{**m, "content": text_of(m["content"], f"messages.{i}.content", model_id)}
                        for i, m in enumerate(payload["messages"])]
            if self.tokenizer.chat_template is None:
                raise InvalidField(f"messages: model {model_id!r} has no chat template; send a prompt",
                                   model_id=model_id, field="messages")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding
        raise InvalidField("input: a text model takes a string prompt or chat messages",
                           model_id=model_id, field="input")

    async def __call__(self, payload: Any, ctx: RequestContext) -> dict[str, Any]:
        ids = self._tokens(payload, ctx.model_id)
        if self.max_model_len and len(ids) >= self.max_model_len:
            raise InvalidField(f"input: the prompt is {len(ids)} tokens; the model's context is "
                               f"{self.max_model_len} tokens", model_id=ctx.model_id, field="input")
        max_tokens = getattr(ctx.params, "max_tokens", None)
        if self.max_model_len and max_tokens and len(ids) + max_tokens > self.max_model_len:
            raise InvalidField(f"params.max_tokens: {max_tokens} tokens asked for, but the prompt is "
                               f"{len(ids)} tokens and the model's context is {self.max_model_len}: "
                               f"at most {self.max_model_len - len(ids)} can be generated",
                               model_id=ctx.model_id, field="params.max_tokens")
        return {"prompt_token_ids": ids}


def text_of(content: str | list[dict[str, Any]], path: str, model_id: str) -> str:
    """A message's text: the string, or its text parts joined by newlines (as chat templates
    that take a string join them). Other parts (images, audio, video) are refused naming the part."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidField(f"{path}.{i}: a {kind!r} part; this model takes text parts only "
                               f"({{\"type\": \"text\", \"text\": ...}})", model_id=model_id, field=f"{path}.{i}")
        texts.append(part["text"])
    return "\n".join(texts)
