"""The routes around generation, per served model: model card, tokenize, detokenize, embeddings, health.

A mixin of LLMServer (it reads the server's engine, tokenizer and chat template), so that handle
callers and both ingress modes get the same answers. Shapes are vLLM's for ``/tokenize`` and
``/detokenize`` and OpenAI's for ``/v1/embeddings``; errors are ``APIError.to_dict()``.
"""

from __future__ import annotations

import base64
from typing import Any

from fastserve_ray.engine import EngineDeadError, RequestError
from fastserve_ray.serve.protocol import (
    APIError,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    check_messages,
    parse_request,
)
from fastserve_ray.serve.tool_calls import tool_choice, validate_tools


class ModelRoutes:
    """Mixed into LLMServer: needs ``served_name``, ``engine``, ``tokenizer``, ``max_model_len``,
    ``_encode``, ``_prompt_ids`` and ``_chat_prompt``."""

    served_name: str
    engine: Any
    tokenizer: Any
    max_model_len: int

    def model_card(self, created: int) -> dict[str, Any]:
        """This model's entry of ``GET /v1/models`` (OpenAI's fields plus vLLM's max_model_len)."""
        card = {"id": self.served_name, "object": "model", "created": created, "owned_by": "fastserve-ray",
                "max_model_len": self.max_model_len}
        lineage = getattr(self, "lineage", None)  # where the served artifact came from (its manifest)
        if lineage:
            card["lineage"] = lineage
        startup = getattr(self, "startup_s", None)  # a Serve replica's cold start, phase by phase
        if startup:
            card["startup_s"] = {k: round(v, 3) for k, v in startup.items()}
        return card

    async def health(self) -> dict[str, Any]:
        """``{"status": "ok"}`` while the engine runs, else a 503 error naming the model."""
        if self.engine.is_running:
            return {"status": "ok"}
        return APIError(f"the engine of model {self.served_name!r} is not running", 503,
                        type="server_error", code="engine_dead").to_dict()

    def _check_model(self, req: Any) -> None:
        if req.model != self.served_name:
            raise APIError(f"model {req.model!r} does not exist", 404, param="model", code="model_not_found")
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer", param="model")

    async def tokenize(self, body: Any) -> dict[str, Any]:
        """``POST /tokenize``: the token ids a prompt or a chat becomes, as generation sees them."""
        try:
            req = parse_request(TokenizeRequest, body)
            self._check_model(req)
            if (req.prompt is None) == (req.messages is None):
                raise APIError("send exactly one of prompt and messages", param="prompt")
            if req.prompt is not None:
                if req.add_special_tokens is False:
                    ids = self.tokenizer.encode(req.prompt) if req.prompt else []
                else:
                    ids = self._encode(req.prompt, "prompt")
            else:
                check_messages(req.messages)
                req._tools = validate_tools(req.tools)
                req._tool_choice = tool_choice(None, req._tools)
                ids = self._chat_prompt(req)
        except APIError as e:
            return e.to_dict()
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return out

    async def detokenize(self, body: Any) -> dict[str, Any]:
        """``POST /detokenize``: the text of token ids (special tokens kept)."""
        try:
            req = parse_request(DetokenizeRequest, body)
            self._check_model(req)
            vocab = self.engine.vocab_size
            for i, t in enumerate(req.tokens):
                if not 0 <= t < vocab:
                    raise APIError(f"tokens.{i}: token id {t} is outside the vocabulary", param="tokens")
        except APIError as e:
            return e.to_dict()
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    async def embeddings(self, body: Any) -> dict[str, Any]:
        """``POST /v1/embeddings``: one L2-normalised vector per input (last-token pooling)."""
        try:
            req = parse_request(EmbeddingRequest, body)
            if req.model != self.served_name:
                raise APIError(f"model {req.model!r} does not exist", 404, param="model",
                               code="model_not_found")
            inputs = self._prompt_ids(req.input, "input")
            vectors = await self.engine.embed(inputs)
            dim = len(vectors[0])
            if req.dimensions is not None and req.dimensions != dim:
                raise APIError(f"dimensions: this model's embeddings have {dim} dimensions (no "
                               f"truncation), got {req.dimensions}", param="dimensions")
        except APIError as e:
            return e.to_dict()
        except RequestError as e:
            return APIError(e.message, param="input").to_dict()
        except EngineDeadError as e:
            return APIError(f"the engine is not running: {e}", 503, type="server_error",
                            code="engine_dead").to_dict()
        n_tokens = sum(len(x) for x in inputs)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = v
            if req.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
                import numpy as np

                emb = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": self.served_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
