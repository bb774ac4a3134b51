"""The API's request and response bodies (pydantic models: they are the OpenAPI schema).

Requests reject unknown keys (``extra="forbid"``), as recipes and configs do; the recipe itself
travels as a JSON object and is read by ``uqcit.recipe.Recipe`` (see ``uqcit.server.checks``),
so its validation and messages are the CLI's.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from uqcit.server.db import JobRecord

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_ID = r"^[0-9a-f]{32}$"
UPLOAD_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"  # a name or path with no NUL, newline or other control character


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobOptions(_Strict):
    """What the CLI's ``compress`` options set, minus every path (the server chooses those)."""

    quick: int | None = Field(None, ge=1, le=100_000, description="evaluate on only this many windows "
                              "(not the full protocol); null: the recipe's evaluation")
    sign: bool = Field(False, description="sign the package with the server's key (GET /v1/signing-key)")
    encrypt: bool = Field(False, description="encrypt the weight files (AES-256-GCM) under the secret")
    encode: bool = Field(False, description="keyed signed-permutation encoding of the weights (obfuscation)")
    secret: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="32-byte secret, hex "
                               "(for encrypt/encode); used for this job only, never stored")
    passphrase: str | None = Field(None, min_length=1, max_length=1024, description="passphrase instead "
                                   "of a secret (stretched with scrypt); used for this job only, never stored")


class JobRequest(_Strict):
    """A job: a model, a recipe, and options."""

    model: str = Field(..., min_length=1, max_length=4096, pattern=NO_CONTROL,
                       description="a built-in model name (GET /v1/models), upload:NAME for an uploaded "
                       "model, or an absolute path inside one of the server's model folders")
    recipe: Union[str, dict[str, Any]] = Field(..., description="a built-in recipe name (GET /v1/recipes) "
                                               "or a recipe object (the JSON of `uqcit recipes NAME`)")
    options: JobOptions = Field(default_factory=JobOptions)


class Job(BaseModel):
    """A job as the API shows it; ``progress`` counts finished steps of ``stages``."""

    id: str
    state: JobState
    model: str
    recipe: str = Field(..., description="the recipe's name")
    options: dict[str, Any] = Field(..., description="the job's options, without its secret")
    stages: list[str] = Field(..., description="the steps of the job: load, each recipe stage, package")
    stage: str | None = Field(..., description="the step running now, or the last one reached")
    progress: float = Field(..., ge=0, le=1)
    created_at: float = Field(..., description="seconds since the epoch")
    started_at: float | None
    finished_at: float | None
    queue_seconds: float | None = Field(..., description="time spent waiting in the queue")
    error: str | None = Field(..., description="why it failed or was cancelled")

    @classmethod
    def of(cls, rec: JobRecord) -> "Job":
        return cls(id=rec.id, state=rec.state, model=rec.model, recipe=rec.recipe_name, options=rec.options,
                   stages=rec.stages, stage=rec.stage, progress=rec.progress, created_at=rec.created_at,
                   started_at=rec.started_at, finished_at=rec.finished_at,
                   queue_seconds=None if rec.started_at is None else rec.started_at - rec.created_at,
                   error=rec.error)


class JobList(BaseModel):
    jobs: list[Job]


class RecipeInfo(BaseModel):
    name: str
    description: str


class RecipeList(BaseModel):
    recipes: list[RecipeInfo]


class ModelInfo(BaseModel):
    model: str = Field(..., description="what to put in a job's `model`")
    kind: Literal["built-in", "upload", "folder"]
    description: str


class ModelList(BaseModel):
    models: list[ModelInfo]
    model_dirs: list[str] = Field(..., description="folders whose model sub-folders a job may name by path")


class SigningKey(BaseModel):
    public_key_pem: str
    fingerprint: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ErrorDetail(BaseModel):
    code: str = Field(..., description="machine-readable: unauthorized, bad_recipe, path_not_allowed, ...")
    message: str = Field(..., description="one line: what is wrong and what to do")


class ErrorBody(BaseModel):
    error: ErrorDetail
