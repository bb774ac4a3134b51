"""Everything a job request is checked against before it is queued, and the API's error type.

The recipe is read by ``Recipe.from_dict`` (the CLI's typed configs: an unknown key fails with the
same message) and checked by ``uqcit.pipeline.preflight``; then no field of it may name a file:
the server reads and writes only its data folder on a client's say (``FILE_FIELDS``). A model is a
built-in name, an uploaded one (``upload:NAME``) or a path inside an operator's model folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from uqcit.core.keys import ConfigError
from uqcit.server.settings import ServerSettings

UPLOAD_SCHEME = "upload:"
# Recipe fields that name a file on the machine running the job: (stage type, field) -> the
# values a client may give (None: only null; the server keeps such files nowhere).
# tests/server/test_checks.py fails when a stage grows a str field that is in neither this table
# nor its list of fields known to name no file.
FILE_FIELDS: dict[tuple[str, str], str] = {
    ("eval", "corpus"): "corpus",  # a built-in corpus name (uqcit.inputs.corpus.CORPORA), never a path
    ("sensitivity", "path"): "none",
    ("retrain", "checkpoint"): "none",
}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, a ``code`` and a one-line ``message``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_recipe(value: str | dict[str, Any]):
    """A ``Recipe`` from a built-in name or a recipe object; ``ApiError`` 422 ``bad_recipe`` otherwise.

    >>> parse_recipe("rtn-w4-g128").name
    'rtn-w4-g128'
    >>> parse_recipe({"name": "x", "stages": [], "colour": 1})
    Traceback (most recent call last):
    ...
    uqcit.server.checks.ApiError: unknown key(s) ['colour'] for recipe; allowed keys: ['description', 'name', 'stages']
    """
    from uqcit.recipe import Recipe, builtin_recipe

    if isinstance(value, str):
        try:
            return builtin_recipe(value)
        except ConfigError as exc:  # never a file: a server reads no recipe path
            raise ApiError(422, "bad_recipe", f"{exc} (send any other recipe as its JSON object)") from None
    try:
        return Recipe.from_dict(value)
    except ConfigError as exc:
        raise ApiError(422, "bad_recipe", str(exc)) from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:  # JSON of another shape
        raise ApiError(422, "bad_recipe", f"not a recipe ({type(exc).__name__}: {exc}); see "
                       "GET /v1/recipes/uqcit-default for the form") from None


def check_recipe_files(recipe) -> None:
    """Refuse (403 ``path_not_allowed``) a recipe field that names a file on the server.

    >>> from uqcit.recipe import builtin_recipe
    >>> from uqcit.stages.evaluate import EvalConfig
    >>> check_recipe_files(builtin_recipe("rtn-w4-g128").with_stage(EvalConfig(corpus="/etc/passwd")))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    uqcit.server.checks.ApiError: recipe 'rtn-w4-g128': EvalConfig.corpus '/etc/passwd' names a file; ...
    """
    from uqcit.inputs.corpus import CORPORA, HUMANEVAL

    for stage in recipe.stages:
        for (tag, field), allowed in FILE_FIELDS.items():
            if stage.type_tag != tag:
                continue
            value = getattr(stage, field)
            where = f"recipe {recipe.name!r}: {type(stage).__name__}.{field} {value!r}"
            if allowed == "corpus" and value not in (*CORPORA, HUMANEVAL):
                raise ApiError(403, "path_not_allowed", f"{where} names a file; a server reads no file on a "
                               f"client's say: use a built-in corpus ({sorted((*CORPORA, HUMANEVAL))})")
            if allowed == "none" and value is not None:
                raise ApiError(403, "path_not_allowed", f"{where} names a file; a server writes no file on "
                               "a client's say: set it to null")


def resolve_model(model: str, settings: ServerSettings) -> str:
    """What ``load_model`` is given for a job's ``model``; ``ApiError`` 422/403 when it is not allowed.

    >>> s = ServerSettings(data=Path("/srv/uqcit"), model_dirs=(Path("/srv/models"),))
    >>> resolve_model("tiny-llama", s), resolve_model("upload:my-model", s)
    ('tiny-llama', '/srv/uqcit/models/my-model')
    >>> resolve_model("/srv/models/../../etc", s)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    uqcit.server.checks.ApiError: model path '/srv/models/../../etc' is outside the server's model folders ...
    """
    from uqcit.inputs.models import MODEL_ALIASES

    if model in MODEL_ALIASES:
        return model
    roots = [settings.uploads_dir, *settings.model_dirs]
    if model.startswith(UPLOAD_SCHEME):
        name = model.removeprefix(UPLOAD_SCHEME)
        if not name or "/" in name or name.startswith(".") or "\x00" in name:
            raise ApiError(422, "bad_model", f"{model!r}: an uploaded model's name has no '/' and does not "
                           "start with '.'; GET /v1/models lists them")
        return str(settings.uploads_dir / name)
    if not model.startswith("/"):
        raise ApiError(422, "bad_model", f"model {model!r} is not a built-in model ({sorted(MODEL_ALIASES)}), "
                       f"an uploaded model ({UPLOAD_SCHEME}NAME) or an absolute path in the server's model "
                       f"folders ({[str(r) for r in settings.model_dirs]}); GET /v1/models lists them")
    # Decided on the text first (nothing outside is even looked at), then again after resolving
    # symbolic links, so a link inside a model folder cannot lead out of it.
    real = None
    if _inside(Path(os.path.normpath(model)), roots):
        real = Path(model).resolve()
    if real is None or not _inside(real, [r.resolve() for r in roots]):
        raise ApiError(403, "path_not_allowed", f"model path {model!r} is outside the server's model "
                       f"folders ({[str(r) for r in settings.model_dirs]}); name a model folder inside "
                       "one, upload the model (PUT /v1/models/NAME), or use a built-in model")
    return str(real)


def _inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path`` is strictly below one of ``roots`` (a root itself is no model folder)."""
    return any(path != root and path.is_relative_to(root) for root in roots)


def check_options(options, settings: ServerSettings) -> None:
    """Options that do not fit together, or need what this server lacks: 422 ``bad_options``."""
    protect = options.encrypt or options.encode
    if options.secret and options.passphrase:
        raise ApiError(422, "bad_options", "give options.secret or options.passphrase, not both")
    if protect and not (options.secret or options.passphrase):
        raise ApiError(422, "bad_options", "options.encrypt/encode need options.secret (64 hex digits) "
                       "or options.passphrase")
    if (options.secret or options.passphrase) and not protect:
        raise ApiError(422, "bad_options", "options.secret/passphrase are used only with options.encrypt "
                       "or options.encode; drop them (the server keeps no secret)")
    if options.sign and settings.sign_key is None:
        raise ApiError(422, "bad_options", "this server has no signing key (its operator starts it with "
                       "`uqcit serve --sign-key KEY`); drop options.sign")


def job_stages(recipe) -> list[str]:
    """The steps a job's progress counts: loading, each stage the recipe runs, then the package
    (export, load back, evaluate, seal).

    >>> from uqcit.recipe import builtin_recipe
    >>> job_stages(builtin_recipe("rtn-w4-g128"))
    ['load', 'levels', 'plan', 'quantize', 'package']
    """
    return ["load", *[s.type_tag for s in recipe.stages if s.type_tag != "eval"], "package"]
