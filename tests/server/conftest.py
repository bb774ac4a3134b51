"""A real server process on a free loopback port, shared by the server tests of this folder.

``server`` starts ``uqcit serve`` once per test package (``--port 0``: the port is read from its
first line), with two job slots, a 1 MiB upload limit, a signing key and a model folder holding
a tiny model and a symbolic link that leads out of it. Its log is kept beside its data folder and
shown when it fails to start.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server_helpers import ServerProcess, new_key, tiny_model_folder
from uqcit.client import Client


@dataclass
class Running:
    url: str
    key: str
    data: Path
    models: Path  # the server's --models folder
    proc: ServerProcess

    def restart(self, *, kill: bool) -> None:
        """Stop the server (SIGKILL: a crash; else SIGTERM) and start another on the same data."""
        self.proc.kill() if kill else self.proc.stop()
        self.proc = ServerProcess(self.data, *self.proc.args)
        self.url = self.proc.url

    def client(self) -> Client:
        return Client(self.url, self.key)

    def request(self, method: str, path: str, *, key: str | None = "default", **kwargs) -> httpx.Response:
        headers = {} if key is None else {"X-API-Key": self.key if key == "default" else key}
        return httpx.request(method, self.url + path, headers={**headers, **kwargs.pop("headers", {})},
                             timeout=60, **kwargs)


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    from uqcit.package.secure import keygen

    root = tmp_path_factory.mktemp("server")
    models = root / "models"
    tiny_model_folder(models / "tiny-folder")
    (models / "escape").symlink_to("/etc")  # inside the folder, leading out of it
    sign_key, _ = keygen(root / "keys", "server")
    data = root / "data"
    key = new_key(data)
    proc = ServerProcess(data, "--max-jobs", "2", "--max-upload-mb", "1", "--models", str(models),
                         "--sign-key", str(sign_key))
    running = Running(url=proc.url, key=key, data=data, models=models, proc=proc)
    yield running
    running.proc.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
