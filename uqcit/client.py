"""Python client of the REST API (``uqcit serve``, docs/server.md): jobs, their progress and packages.

Every refusal or failure is a ``ServerError`` whose one-line message is the server's; a package
is downloaded, checked against its SHA-256 manifest and swapped in at the target, like a local
export (a failed download leaves the target as it was). Needs ``httpx`` (the ``server`` extra).

>>> with Client("http://127.0.0.1:8765", api_key="uqk_...") as c:  # doctest: +SKIP
...     job = c.submit("tiny-llama", "rtn-w4-g128", quick=1)
...     c.wait(job["id"])["state"]
...     c.download_package(job["id"], "pkg")
'succeeded'
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

API_KEY_HEADER = "X-API-Key"  # uqcit.server.auth.HEADER (the client does not import the server)
CHUNK = 1 << 20


class ServerError(Exception):
    """A request the server refused (4xx) or failed (5xx), or a server that cannot be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def _error(response) -> ServerError:
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = None, response.text[:200] or response.reason_phrase
    return ServerError(f"server: {response.status_code} {code or ''}: {message}".replace(" :", ":"),
                       response.status_code, code)


class Client:
    """A connection to one server with one API key (see the module docstring)."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        self._httpx = httpx
        self._http = httpx.Client(base_url=self.url, headers={API_KEY_HEADER: api_key}, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs):
        try:
            response = self._http.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    # ------------------------------------------------------------------ reading

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health").json()

    def recipes(self) -> list[dict[str, str]]:
        """Built-in recipes: name and description."""
        return self._request("GET", "/v1/recipes").json()["recipes"]

    def recipe(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/recipes/{name}").json()

    def models(self) -> dict[str, Any]:
        """Models a job may name (``models``) and the server's model folders (``model_dirs``)."""
        return self._request("GET", "/v1/models").json()

    def signing_key(self) -> dict[str, str]:
        """The server's package-signing public key: ``public_key_pem``, ``fingerprint``."""
        return self._request("GET", "/v1/signing-key").json()

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params = {"limit": limit, **({"state": state} if state else {})}
        return self._request("GET", "/v1/jobs", params=params).json()["jobs"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def report(self, job_id: str) -> dict[str, Any]:
        """A succeeded job's report (``JobReport.to_dict()``; ``job_report`` rebuilds the object)."""
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    # ------------------------------------------------------------------ jobs

    def submit(self, model: str, recipe, *, quick: int | None = None, sign: bool = False,
               encrypt: bool = False, encode: bool = False, secret=None) -> dict[str, Any]:
        """Queue a job. ``recipe``: a built-in name, a ``Recipe`` or its dict; ``secret``: a
        ``uqcit.package.secure.Secret`` for ``encrypt``/``encode`` (sent for this job only)."""
        if hasattr(recipe, "to_dict"):
            recipe = recipe.to_dict()
        options: dict[str, Any] = {"quick": quick, "sign": sign, "encrypt": encrypt, "encode": encode}
        if secret is not None:
            if secret.kind == "raw":
                options["secret"] = secret.material.hex()
            else:
                options["passphrase"] = secret.material.decode("utf-8")
        return self._request("POST", "/v1/jobs", json={"model": model, "recipe": recipe, "options": options}).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events as (event, job) pairs: ``job`` on each change, then ``end``."""
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                event, data = "message", []
                for line in response.iter_lines():
                    if line.startswith(":"):
                        continue  # a keepalive comment
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield event, json.loads("\n".join(data))
                        event, data = "message", []
        except self._httpx.HTTPError as exc:
            raise ServerError(f"lost the event stream of job {job_id} at {self.url}: {exc}") from None

    def wait(self, job_id: str, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the job's events until it ends; returns the ended job. ``on_event(job)`` sees each change."""
        for event, job in self.events(job_id):
            if on_event is not None and event == "job":
                on_event(job)
            if event == "end":
                return job
        return self.job(job_id)  # the stream closed early: the job's state as it is

    def upload_model(self, name: str, folder: str | os.PathLike) -> dict[str, Any]:
        """Upload a model folder (its top-level files: config, safetensors, tokenizer); jobs then name
        it ``upload:NAME``."""
        folder = Path(folder)
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w") as tar:
                for path in sorted(p for p in folder.iterdir() if p.is_file()):
                    tar.add(path, arcname=path.name, recursive=False)
            size = tmp.tell()
            tmp.seek(0)

            def chunks() -> Iterator[bytes]:
                while block := tmp.read(CHUNK):
                    yield block

            return self._request("PUT", f"/v1/models/{name}", content=chunks(), timeout=None, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size)}).json()

    def download_package(self, job_id: str, out: str | os.PathLike) -> Path:
        """Download a succeeded job's package to ``out`` (a new path, an empty folder or a package,
        replaced in one swap), checked against its manifest first."""
        from uqcit.package.secure import verify_manifest
        from uqcit.package.swap import check_target, swap_into_place, target_lock, temp_name

        out = Path(out)
        check_target(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(out)
        try:
            with tempfile.TemporaryFile() as archive:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/package", timeout=None) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for block in response.iter_bytes(CHUNK):
                        archive.write(block)
                archive.seek(0)
                _unpack(archive, tmp)
            verify_manifest(tmp)  # a transfer that lost or changed a byte fails here, naming the file
            with target_lock(out):
                check_target(out)
                swap_into_place(tmp, out)
        except self._httpx.HTTPError as exc:
            raise ServerError(f"download of job {job_id}'s package from {self.url} failed: {exc}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out


def _unpack(archive, dest: Path) -> None:
    """Unpack a package archive into the new folder ``dest``: plain files and folders, inside it only."""
    dest.mkdir()
    with tarfile.open(fileobj=archive, mode="r:") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not parts or member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                raise ServerError(f"the package archive holds {member.name!r}, which is not a plain file "
                                  "inside the package; refusing it")
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "xb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)


def job_report(data: dict[str, Any]):
    """A ``uqcit.pipeline.JobReport`` rebuilt from its dict (``Client.report``)."""
    from uqcit.pipeline import JobReport
    from uqcit.stages.evaluate import EvalResult

    return JobReport(**{**data, "reference": EvalResult(**data["reference"]),
                        "compressed": EvalResult(**data["compressed"])})


def run_remote(url: str, api_key: str, model: str, recipe, out: str | os.PathLike, *, quick: int | None = None,
               sign: bool = False, encrypt: bool = False, encode: bool = False, secret=None,
               progress: bool = True):
    """``uqcit compress --server``: the job on a server, its package downloaded to ``out``; returns
    its ``JobReport``. Interrupting it (Ctrl-C) cancels the job on the server."""
    with Client(url, api_key) as client:
        job = client.submit(model, recipe, quick=quick, sign=sign, encrypt=encrypt, encode=encode, secret=secret)
        shown = [None]

        def show(j: dict[str, Any]) -> None:
            line = f"job {j['id'][:8]}: {j['state']}, {j['stage'] or 'waiting'} ({j['progress']:.0%})"
            if progress and line != shown[0]:
                print(line, file=sys.stderr, flush=True)
                shown[0] = line

        try:
            final = client.wait(job["id"], on_event=show)
        except KeyboardInterrupt:
            client.cancel(job["id"])
            raise
        if final["state"] != "succeeded":
            raise ServerError(f"job {final['id']} {final['state']}: {final['error']}")
        client.download_package(final["id"], out)
        report = job_report(client.report(final["id"]))
    report.package = str(out)
    return report
