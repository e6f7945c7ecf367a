"""Text preprocessing: a prompt or chat messages become the token ids an LLM engine generates from."""

from __future__ import annotations

import asyncio
from typing import Any

from core.errors import InvalidField
from core.protocol import RequestContext
from nodes.base import Node


class TextPrompt(Node):
    """Tokenizes ``input``/``prompt`` (a string) or ``messages`` (chat, through the tokenizer's
    chat template), and refuses prompts that do not fit the model's context (422 with both numbers).
    """

    def __init__(self, kwargs, model) -> None:
        super().__init__(kwargs, model)
        self.tokenizer = None
        self.max_model_len: int | None = model.engine_kwargs.get("max_model_len")

    async def start(self) -> None:
        self.tokenizer, context = await asyncio.to_thread(self._load)
        self.max_model_len = self.max_model_len or context

    def _load(self):
        from transformers import AutoConfig, AutoTokenizer

        from engines.checkpoints import resolve_source

        kw = self.model.engine_kwargs
        source = resolve_source(self.model.source)
        trust = bool(kw.get("trust_remote_code", False))
        tokenizer = AutoTokenizer.from_pretrained(kw.get("tokenizer") or source, revision=kw.get("revision"),
                                                  trust_remote_code=trust)
        config = AutoConfig.from_pretrained(source, revision=kw.get("revision"), trust_remote_code=trust)
        return tokenizer, getattr(config, "max_position_embeddings", None)

    def _tokens(self, payload: Any, model_id: str) -> list[int]:
        if isinstance(payload, str):
            if not payload:
                raise InvalidField("input: the prompt is empty", model_id=model_id, field="input")
            return self.tokenizer.encode(payload, add_special_tokens=True)
        if isinstance(payload, dict) and set(payload) == {"messages"}:
            messages = payload["messages"]
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
        return {"prompt_token_ids": ids}
