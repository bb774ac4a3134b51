"""The REST API over HTTP, against a real server process (``server`` in conftest.py): a job end to
end, cancelling and queueing, and every refusal as a 4xx with a JSON error body."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from uqcit.core.keys import ConfigError
from uqcit.recipe import Recipe
from uqcit.server.app import openapi_schema

from server_helpers import LONG, QUICK, events_until, job_pid, pid_alive, running_stage


def _error(response, status: int, code: str | None = None) -> str:
    """The message of a JSON error body, after checking its status and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def _submit(server, model="tiny-llama", recipe=None, **options):
    return server.request("POST", "/v1/jobs", json={"model": model, "recipe": recipe or QUICK.to_dict(),
                                                     "options": options})


def _tar(files: dict[str, bytes], kinds: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if kinds and name in kinds:
                info.type, info.size, info.linkname = kinds[name], 0, "/etc/passwd"
                tar.addfile(info)
            else:
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_health_needs_no_key_and_every_other_endpoint_does(server):
    assert server.request("GET", "/health", key=None).json() == {"status": "ok", "version": "0.1.0"}
    operations = [(method, path) for path, ops in openapi_schema()["paths"].items() for method in ops
                  if path != "/health"]
    assert len(operations) >= 11
    for method, path in operations:
        url = path.replace("{job_id}", "0" * 32).replace("{name}", "x")
        for key in (None, "uqk_not-a-key"):
            _error(server.request(method.upper(), url, key=key), 401, "unauthorized")


def test_a_tiny_model_job_runs_end_to_end_over_http(server, client, tmp_path):
    from uqcit.package import load_package, package_bytes

    job = client.submit("tiny-llama", QUICK, sign=True)
    assert job["state"] == "queued" and job["stages"] == ["load", "levels", "plan", "quantize", "package"]
    seen = []
    final = client.wait(job["id"], on_event=seen.append)
    assert final["state"] == "succeeded", final["error"]
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and seen[-1]["stage"] == "package"
    assert final["queue_seconds"] >= 0 and final["finished_at"] >= final["started_at"]

    report = client.report(job["id"])
    assert report["method"] == "rtn-w4-g128" and report["compressed"]["windows"] == 1
    out = client.download_package(job["id"], tmp_path / "pkg")
    assert package_bytes(out) == report["package_bytes"]
    public = load_pem_public_key(client.signing_key()["public_key_pem"].encode())
    pkg = load_package(out, progress=False, public_key=public)  # verifies the server's signature
    assert pkg.model(__import__("torch").tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
    assert job["id"] in [j["id"] for j in client.jobs(state="succeeded")]


def test_a_running_job_is_cancelled_and_extra_jobs_queue(server, client):
    from uqcit.package.secure import Secret

    a, b = (client.submit("tiny-llama", LONG)["id"] for _ in range(2))
    secret = Secret.from_bytes(bytes(range(32)))
    c = client.submit("tiny-llama", QUICK, encrypt=True, secret=secret)["id"]
    events_until(client, a, running_stage("retrain"))
    events_until(client, b, lambda j: j["state"] == "running")
    assert client.job(c)["state"] == "queued"  # two slots (--max-jobs 2), both held
    assert "secret" not in client.job(c)["options"]
    stored = b"".join(p.read_bytes() for p in server.data.glob("uqcit-server.sqlite3*"))
    assert secret.material.hex().encode() not in stored and secret.material not in stored  # memory only
    assert client.cancel(c)["state"] == "cancelled"  # a queued job, never started
    pid = job_pid(server.data, a)
    cancelled = client.cancel(a)
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by a client"
    assert not pid_alive(pid)  # killed before the answer came back
    assert not (server.data / "jobs" / a).exists()
    assert client.cancel(b)["state"] == "cancelled"
    _error(server.request("POST", f"/v1/jobs/{a}/cancel"), 409, "job_ended")
    _error(server.request("GET", f"/v1/jobs/{a}/package"), 409, "job_not_succeeded")
    _error(server.request("GET", f"/v1/jobs/{a}/report"), 409, "job_not_succeeded")


BAD_RECIPES = [
    {"name": "x", "stages": [], "colour": 1},
    {"name": "x", "stages": [{"type": "levels", "colour": 2}]},
    {"name": "x", "stages": [{"type": "no-such-stage"}]},
    {"name": "x", "stages": [{"type": "quantize", "method": "nope"}]},
    {"type": "recipe", "version": 7, "name": "x", "stages": []},
]


@pytest.mark.parametrize("recipe", BAD_RECIPES)
def test_a_bad_recipe_is_422_with_the_cli_s_message(server, recipe):
    with pytest.raises(ConfigError) as expected:
        Recipe.from_dict(recipe)
    assert _error(_submit(server, recipe=recipe), 422, "bad_recipe") == str(expected.value)


@pytest.mark.parametrize("recipe, words", [
    ("no-such-recipe", "no built-in recipe"),
    ("/etc/passwd.json", "no built-in recipe"),  # a name, never a file the server reads
    ({"name": "x", "stages": [{"type": "levels"}]}, "nothing to export"),  # uqcit.pipeline.preflight
    ({"name": "x", "stages": "levels"}, "not a recipe"),
])
def test_recipes_are_checked_before_queueing(server, recipe, words):
    assert words in _error(_submit(server, recipe=recipe), 422, "bad_recipe")


def _with(stage: dict) -> dict:
    d = QUICK.to_dict()
    d["stages"] = [s for s in d["stages"] if s["type"] != stage["type"]] + [stage]
    return d


def test_no_path_outside_the_server_s_folders_is_used(server):
    models = server.models
    for model in ("/etc", f"{models}/../..", f"{models}/escape", f"{models}/escape/passwd", str(models)):
        assert "outside the server's model folders" in _error(_submit(server, model=model), 403, "path_not_allowed")
    for model in ("org/some-model", "etc/passwd", "upload:../x", "upload:"):
        _error(_submit(server, model=model), 422, "bad_model")
    for stage in ({"type": "eval", "corpus": "/etc/passwd", "max_windows": 1},
                  {"type": "sensitivity", "path": "/tmp/steal.safetensors"},
                  {"type": "retrain", "checkpoint": "/tmp/ckpt.safetensors"}):
        assert "names a file" in _error(_submit(server, recipe=_with(stage)), 403, "path_not_allowed")
    # inside the model folder: accepted (then cancelled: only the check matters here)
    job = _submit(server, model=f"{models}/tiny-folder")
    assert job.status_code == 202, job.text
    server.request("POST", f"/v1/jobs/{job.json()['id']}/cancel")


def test_bad_options_and_bodies_are_4xx(server):
    _error(_submit(server, encrypt=True), 422, "bad_options")
    _error(_submit(server, secret="ab" * 32), 422, "bad_options")
    _error(_submit(server, encrypt=True, secret="ab" * 32, passphrase="x"), 422, "bad_options")
    _error(_submit(server, quick=0), 422, "invalid_request")
    _error(_submit(server, colour=1), 422, "invalid_request")
    _error(server.request("POST", "/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}),
           422, "invalid_request")
    _error(server.request("POST", "/v1/jobs", json={"model": "tiny-llama", "recipe": {"pad": "x" * (2 << 20)}}),
           413, "too_large")
    deep = b'{"model": "tiny-llama", "recipe": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past json's recursion
    _error(server.request("POST", "/v1/jobs", content=deep, headers={"Content-Type": "application/json"}), 400)
    _error(server.request("GET", "/v1/jobs/" + "0" * 32), 404, "not_found")
    _error(server.request("GET", "/v1/jobs/not-an-id"), 422, "invalid_request")
    _error(server.request("GET", "/v1/recipes/nope"), 404, "not_found")


def test_model_uploads_are_checked_and_limited(server, client):
    folder = server.models / "tiny-folder"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    put = lambda name, body, **kw: server.request("PUT", f"/v1/models/{name}", content=body, **kw)  # noqa: E731
    assert put("up-tiny", _tar(files)).json()["model"] == "upload:up-tiny"
    assert "upload:up-tiny" in [m["model"] for m in client.models()["models"]]
    _error(put("up-tiny", _tar(files)), 409, "exists")  # never replaced
    _error(put("big", b"\0" * ((1 << 20) + 1)), 413, "too_large")  # declared length over 1 MiB
    _error(put("big", iter([b"\0" * (1 << 19)] * 3)), 413, "too_large")  # chunked, counted as it comes
    _error(put("junk", b"not a tar archive"), 400, "bad_upload")
    _error(put("dots", _tar({"../config.json": b"{}"})), 400, "bad_upload")
    _error(put("nested", _tar({"sub/config.json": b"{}"})), 400, "bad_upload")
    _error(put("link", _tar({"config.json": b""}, kinds={"config.json": tarfile.SYMTYPE})), 400, "bad_upload")
    assert "pickle" in _error(put("pickle", _tar({**files, "pytorch_model.bin": b"x"})), 400, "bad_upload")
    _error(put("no-config", _tar({"model.safetensors": files["model.safetensors"]})), 400, "bad_upload")
    _error(put(".hidden", _tar(files)), 422, "invalid_request")
    assert not any(p.name.startswith(".") for p in (server.data / "models").iterdir())  # no leftovers
    job = client.submit("upload:up-tiny", QUICK)  # an uploaded model is a model jobs may name
    client.cancel(job["id"])


def test_listing_endpoints(server, client):
    names = [r["name"] for r in client.recipes()]
    assert "uqcit-default" in names
    assert Recipe.from_dict(client.recipe("rtn-w4-g128")).name == "rtn-w4-g128"
    models = client.models()
    assert models["model_dirs"] == [str(server.models.resolve())]
    assert {"tiny-llama", f"{server.models.resolve()}/tiny-folder"} <= {m["model"] for m in models["models"]}
    assert all(j["state"] == "cancelled" for j in client.jobs(state="cancelled"))
    assert json.loads(server.request("GET", "/openapi.json", key=None).text)["info"]["title"]
