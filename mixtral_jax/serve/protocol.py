"""Request and response shapes of the OpenAI API (`/v1/completions`, `/v1/chat/completions`), as the official
client sends and reads them. Fields this server does not know are ignored, as OpenAI's own server does; those
it knows but does not support (tools, a response format, a suffix, best_of) are refused by the routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)  # an extension, as vLLM's
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(Sampling):
    prompt: str | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    safe_prompt: bool = False  # Mistral's: the safe-mode system prompt first, as `chat --safe` does
    tools: list[dict] | None = None
    functions: list[dict] | None = None
    response_format: dict | None = None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body, as every refusal carries it: `param` names the field at fault."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
