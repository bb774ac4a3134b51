"""The REST API (FastAPI): jobs, their progress, packages and reports; recipes, models, health.

Every endpoint but ``/health`` (and the schema pages) needs an API key in the ``X-API-Key``
header (``uqcit serve-key create``). Every refusal is a 4xx with the JSON body
``{"error": {"code": ..., "message": ...}}`` (``ErrorBody``); a 5xx is a bug. The schema is
committed as docs/openapi.json (``uqcit serve --openapi FILE`` writes it; a test compares).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.routing import Match

import uqcit
from uqcit.server import checks, schemas
from uqcit.server.auth import HEADER, check_key
from uqcit.server.checks import ApiError
from uqcit.server.db import JobStore
from uqcit.server.jobs import JobRunner
from uqcit.server.limits import BodyLimit, http_error_code
from uqcit.server.settings import ServerSettings
from uqcit.server.uploads import CHUNK, too_large, unpack

EVENT_POLL_SECONDS = 0.25  # how often an event stream looks at its job
KEEPALIVE_SECONDS = 15.0  # a comment line on a quiet stream, so proxies keep it open
ERRORS = {code: {"model": schemas.ErrorBody, "description": text} for code, text in (
    (401, "missing, unknown or revoked API key"), (422, "invalid request"))}
UPLOAD_BODY = {"required": True, "description": "a tar archive (.tar or .tar.gz) of a model folder's files",
               "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
JOB_ID = PathParam(..., pattern=schemas.JOB_ID, description="a job id (32 hex digits)")
_api_key = APIKeyHeader(name=HEADER, auto_error=False, description="a key from `uqcit serve-key create`")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _responses(*codes: int) -> dict[int, dict[str, Any]]:
    text = {403: "a path outside the server's folders", 404: "no such job, recipe or key",
            409: "the job is not in a state that allows it", 413: "the body is over the server's limit",
            400: "a malformed body (not JSON, not a tar archive)"}
    return {**ERRORS, **{c: {"model": schemas.ErrorBody, "description": text[c]} for c in codes}}


def require_key(request: Request, key: str | None = Security(_api_key)) -> int:
    """The dependency every protected endpoint has: the id of the caller's live API key."""
    key_id = check_key(request.app.state.store, key)
    if key_id is None:
        raise ApiError(401, "unauthorized", f"missing, unknown or revoked API key: send a key from "
                       f"`uqcit serve-key create` in the {HEADER} header")
    return key_id


def create_app(settings: ServerSettings | None) -> FastAPI:
    """The application; ``settings=None`` builds it only for its schema (nothing is opened)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.prepare()
        shutil.rmtree(settings.data / "tmp", ignore_errors=True)  # archives of downloads cut short
        app.state.store = JobStore(settings.db_path)
        app.state.runner = JobRunner(settings, app.state.store)
        app.state.runner.start()
        # The first job request needs the recipe machinery (torch, the stages: seconds to import):
        # import it now, beside the event loop, rather than in that request.
        threading.Thread(target=_warm, name="uqcit-warm", daemon=True).start()
        try:
            yield
        finally:
            app.state.runner.stop()
            app.state.store.close()

    app = FastAPI(title="UQCIT Workbench server", version=uqcit.__version__, lifespan=lifespan if settings else None,
                  description="Compression jobs over HTTP: submit a recipe and a model, follow its progress, "
                  "download the package and its report. See docs/server.md.")
    app.state.settings = settings
    if settings is not None:
        app.add_middleware(BodyLimit, request_limit=settings.max_request_bytes,
                           upload_limit=settings.max_upload_bytes, upload_prefix="/v1/models/")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]]
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        response = _error(exc.status_code, http_error_code(exc.status_code), str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the methods of one route; a path may have several
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    _routes(app)
    return app


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (HEAD implied by GET, left out)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods - {"HEAD"})


def _warm() -> None:
    import uqcit.pipeline  # noqa: F401
    from uqcit.core.config import load_stage_modules

    load_stage_modules()


def _state(request: Request) -> tuple[ServerSettings, JobStore, JobRunner]:
    s = request.app.state
    return s.settings, s.store, s.runner


def _job(store: JobStore, job_id: str):
    rec = store.get(job_id)
    if rec is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}; GET /v1/jobs lists them")
    return rec


def _routes(app: FastAPI) -> None:  # noqa: C901 - one flat list of endpoints reads best
    @app.get("/health", response_model=schemas.Health, tags=["server"])
    def health() -> schemas.Health:
        """Liveness; needs no key."""
        return schemas.Health(status="ok", version=uqcit.__version__)

    @app.post("/v1/jobs", response_model=schemas.Job, status_code=202, tags=["jobs"],
              responses=_responses(400, 403, 413))
    def submit(body: schemas.JobRequest, request: Request, response: Response,
               _key: int = Depends(require_key)) -> schemas.Job:
        """Queue a job; it starts when fewer than the server's ``--max-jobs`` run."""
        from uqcit.core.keys import ConfigError
        from uqcit.inputs.models import ModelNotFoundError
        from uqcit.pipeline import preflight

        settings, store, runner = _state(request)
        recipe = checks.parse_recipe(body.recipe)
        checks.check_recipe_files(recipe)
        checks.check_options(body.options, settings)
        model = checks.resolve_model(body.model, settings)
        try:
            preflight(recipe, settings.jobs_dir / "new", model_name=model)
        except ConfigError as exc:
            raise ApiError(422, "bad_recipe", str(exc)) from None
        except ModelNotFoundError as exc:
            raise ApiError(422, "bad_model", str(exc)) from None
        o = body.options
        secret = ((bytes.fromhex(o.secret), "raw") if o.secret else
                  (o.passphrase.encode(), "passphrase") if o.passphrase else None)
        rec = store.add(model=body.model, recipe_json=recipe.to_json(), recipe_name=recipe.name,
                        options=o.model_dump(exclude={"secret", "passphrase"}), stages=checks.job_stages(recipe))
        runner.submit(rec.id, secret)
        response.headers["Location"] = f"/v1/jobs/{rec.id}"
        return schemas.Job.of(rec)

    @app.get("/v1/jobs", response_model=schemas.JobList, tags=["jobs"], responses=_responses())
    def list_jobs(request: Request, state: schemas.JobState | None = None,
                  limit: int = Query(100, ge=1, le=1000), _key: int = Depends(require_key)) -> schemas.JobList:
        """Jobs, newest first."""
        return schemas.JobList(jobs=[schemas.Job.of(r) for r in _state(request)[1].list(state=state, limit=limit)])

    @app.get("/v1/jobs/{job_id}", response_model=schemas.Job, tags=["jobs"], responses=_responses(404))
    def get_job(request: Request, job_id: str = JOB_ID, _key: int = Depends(require_key)) -> schemas.Job:
        return schemas.Job.of(_job(_state(request)[1], job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=schemas.Job, tags=["jobs"], responses=_responses(404, 409))
    def cancel_job(request: Request, job_id: str = JOB_ID, _key: int = Depends(require_key)) -> schemas.Job:
        """Cancel a queued or running job (a running one's process is killed)."""
        _, store, runner = _state(request)
        rec = _job(store, job_id)
        if not runner.cancel(job_id):
            rec = store.get(job_id)
            raise ApiError(409, "job_ended", f"job {job_id} has ended ({rec.state}); only a queued or running "
                           "job can be cancelled")
        return schemas.Job.of(store.get(job_id))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"description": "server-sent events: `job` (the job, on every change), then `end`",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        **_responses(404)})
    async def job_events(request: Request, job_id: str = JOB_ID, _key: int = Depends(require_key)):
        """The job's progress as server-sent events, until it ends."""
        store = _state(request)[1]
        _job(store, job_id)
        return StreamingResponse(_events(store, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/report", response_model=dict[str, Any], tags=["jobs"],
             responses=_responses(404, 409))
    def job_report(request: Request, job_id: str = JOB_ID, _key: int = Depends(require_key)) -> dict[str, Any]:
        """The job's report (``uqcit compress --json``): bits, bytes, perplexity, KL, top-1, times."""
        rec = _finished(_state(request)[1], job_id)
        return json.loads(rec.report_json)

    @app.get("/v1/jobs/{job_id}/package", tags=["jobs"], response_class=FileResponse,
             responses={200: {"description": "the package folder as a tar archive (its files at the top level)",
                              "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                        **_responses(404, 409)})
    def job_package(request: Request, job_id: str = JOB_ID, _key: int = Depends(require_key)):
        """Download the package (tar); ``uqcit.client.Client.download_package`` unpacks and verifies it."""
        settings, store, _ = _state(request)
        _finished(store, job_id)
        archive = _tar_folder(settings.package_dir(job_id), settings.data / "tmp")
        return FileResponse(archive, media_type="application/x-tar", filename=f"uqcit-{job_id}.tar",
                            background=BackgroundTask(os.unlink, archive))

    @app.get("/v1/recipes", response_model=schemas.RecipeList, tags=["recipes"], responses=_responses())
    def list_recipes(_key: int = Depends(require_key)) -> schemas.RecipeList:
        from uqcit.recipe import builtin_recipe, builtin_recipes

        return schemas.RecipeList(recipes=[schemas.RecipeInfo(name=n, description=builtin_recipe(n).description)
                                           for n in builtin_recipes()])

    @app.get("/v1/recipes/{name}", response_model=dict[str, Any], tags=["recipes"], responses=_responses(404))
    def get_recipe(name: str, _key: int = Depends(require_key)) -> dict[str, Any]:
        """A built-in recipe's JSON (the form a job's ``recipe`` object takes)."""
        from uqcit.recipe import builtin_recipes

        if name not in builtin_recipes():
            raise ApiError(404, "not_found", f"no built-in recipe {name!r}; built-in recipes: {builtin_recipes()}")
        return checks.parse_recipe(name).to_dict()

    @app.get("/v1/models", response_model=schemas.ModelList, tags=["models"], responses=_responses())
    def list_models(request: Request, _key: int = Depends(require_key)) -> schemas.ModelList:
        """Models a job may name: built-in, uploaded, and those in the server's model folders."""
        return _models(_state(request)[0])

    @app.put("/v1/models/{name}", response_model=schemas.ModelInfo, status_code=201, tags=["models"],
             responses=_responses(400, 409, 413), openapi_extra={"requestBody": UPLOAD_BODY})
    async def upload_model(request: Request, name: str = PathParam(..., pattern=schemas.UPLOAD_NAME),
                           _key: int = Depends(require_key)) -> schemas.ModelInfo:
        """Upload a model folder as a tar archive (files at the top level; safetensors, no pickle);
        jobs then name it ``upload:NAME``. Limited to the server's ``--max-upload-mb``."""
        settings = _state(request)[0]
        dest = settings.uploads_dir / name
        if dest.exists():
            raise ApiError(409, "exists", f"a model named {name!r} exists already; upload under another name")
        archive = settings.uploads_dir / f".{name}.upload-{secrets.token_hex(8)}"
        try:
            size = 0
            with open(archive, "xb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_upload_bytes:
                        raise too_large(size, settings.max_upload_bytes)
                    out.write(chunk)
            await anyio.to_thread.run_sync(unpack, archive, dest, settings.max_upload_bytes)
        finally:
            archive.unlink(missing_ok=True)
        return schemas.ModelInfo(model=f"{checks.UPLOAD_SCHEME}{name}", kind="upload", description="uploaded")

    @app.get("/v1/signing-key", response_model=schemas.SigningKey, tags=["server"], responses=_responses(404))
    def signing_key(request: Request, _key: int = Depends(require_key)) -> schemas.SigningKey:
        """The public half of the key that signs packages of jobs with ``options.sign``."""
        from cryptography.hazmat.primitives import serialization

        from uqcit.package.secure import fingerprint, load_signing_key

        settings = _state(request)[0]
        if settings.sign_key is None:
            raise ApiError(404, "not_found", "this server has no signing key (uqcit serve --sign-key)")
        env = settings.sign_key_passphrase_env
        public = load_signing_key(settings.sign_key, passphrase=os.environ.get(env) if env else None).public_key()
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return schemas.SigningKey(public_key_pem=pem.decode(), fingerprint=fingerprint(public))


def _finished(store: JobStore, job_id: str):
    rec = _job(store, job_id)
    if rec.state != "succeeded":
        raise ApiError(409, "job_not_succeeded", f"job {job_id} is {rec.state}; its package and report exist "
                       "once it has succeeded (follow GET /v1/jobs/{id}/events)")
    return rec


async def _events(store: JobStore, job_id: str):
    """``event: job`` with the job's JSON on every change, ``event: end`` when it has ended."""
    last, quiet = None, 0.0
    while True:
        rec = await anyio.to_thread.run_sync(store.get, job_id)
        text = schemas.Job.of(rec).model_dump_json()
        if text != last:
            yield f"event: job\ndata: {text}\n\n"
            last, quiet = text, 0.0
        if rec.state not in ("queued", "running"):
            yield f"event: end\ndata: {text}\n\n"
            return
        if quiet >= KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            quiet = 0.0
        await anyio.sleep(EVENT_POLL_SECONDS)
        quiet += EVENT_POLL_SECONDS


def _tar_folder(folder: Path, tmp_dir: Path) -> Path:
    """A tar of ``folder``'s files (relative names, sorted, owner and times zeroed) in ``tmp_dir``."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".tar")

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=plain)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _models(settings: ServerSettings) -> schemas.ModelList:
    from uqcit.inputs.models import MODEL_ALIASES

    found = [schemas.ModelInfo(model=n, kind="built-in", description=d) for n, d in MODEL_ALIASES.items()]
    for kind, root in [("upload", settings.uploads_dir), *[("folder", d) for d in settings.model_dirs]]:
        if not root.is_dir():
            continue
        for sub in sorted(root.iterdir()):
            if not sub.name.startswith(".") and (sub / "config.json").is_file():
                model = f"{checks.UPLOAD_SCHEME}{sub.name}" if kind == "upload" else str(sub)
                found.append(schemas.ModelInfo(model=model, kind=kind, description=str(sub.name)))
    return schemas.ModelList(models=found, model_dirs=[str(d) for d in settings.model_dirs])


def openapi_schema() -> dict[str, Any]:
    """The API's OpenAPI schema, as served at /openapi.json and committed as docs/openapi.json."""
    return create_app(None).openapi()

