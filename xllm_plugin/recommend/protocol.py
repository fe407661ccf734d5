"""JSON of ``POST /xllm/v1/recommend`` (request and response), validated with pydantic."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RecommendRequest(BaseModel):
    """A fixed-step beam search: the best ``top_k`` items of ``num_tokens`` tokens each."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Accepted for OpenAI-style clients; "
                                                        "the server's model is used.")
    prompt: str | None = Field(default=None, description="Text prompt, tokenized by the server.")
    prompt_token_ids: list[int] | None = Field(default=None, description="Prompt as token ids.")
    beam_width: int = Field(default=16, ge=1, description="Beams kept after every step.")
    num_tokens: int | None = Field(
        default=None, ge=1, le=64,
        description="Tokens per item (search steps); default: the catalog's item length.")
    top_k: int | None = Field(default=None, ge=1,
                              description="Items returned, best first; default beam_width.")
    catalog: str | None = Field(
        default=None, description="Restrict items to this catalog (a name from "
                                  "xllm.recommend.catalogs or a file under catalog_dir).")
    return_text: bool = Field(default=False, description="Also decode each item to text.")
    sessions: bool | None = Field(
        default=None, description="A/B override of xllm.recommend.sessions for this request.")
    fork: bool | None = Field(
        default=None, description="A/B override: false = never copy KV for forks "
                                  "(recompute the partial block as stock vLLM does).")

    @model_validator(mode="after")
    def _one_prompt(self) -> RecommendRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if self.catalog is None and self.num_tokens is None:
            raise ValueError("num_tokens is required without a catalog")
        return self


class RecommendedItem(BaseModel):
    token_ids: list[int]
    score: float = Field(description="Sum of the model's log-probs of the item's tokens.")
    text: str | None = None


class RecommendUsage(BaseModel):
    prompt_tokens: int
    engine_requests: int = Field(description="Engine requests (sessions) the search started.")
    continued: int = Field(description="Beam extensions that continued in their parent's session.")
    forked: int = Field(description="Beam extensions that forked a new session.")


class RecommendTiming(BaseModel):
    queued_ms: float = Field(description="Wait for admission (beam slots and KV blocks).")
    step_ms: list[float] = Field(description="Engine time per search step.")
    total_ms: float


class RecommendResponse(BaseModel):
    id: str
    object: str = "xllm.recommendation"
    model: str
    mode: str = Field(description="'sessions' (beams live in the engine) or 'resubmit'.")
    items: list[RecommendedItem]
    usage: RecommendUsage
    timing: RecommendTiming
