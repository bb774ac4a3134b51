"""The server's commands: `uqcit serve-key`, `uqcit compress --server`, and their one-line errors."""
from __future__ import annotations

import json

from server_helpers import QUICK

from uqcit.cli import main as _main


def main(argv: list[str]) -> int:
    """``uqcit.cli.main``'s exit status, whether it returns it or exits with it (argparse's errors)."""
    try:
        return _main(argv)
    except SystemExit as exc:
        return exc.code


def test_serve_key_creates_lists_and_revokes_keys(server, capsys):
    assert main(["serve-key", "create", "--data", str(server.data), "--name", "cli-test"]) == 0
    key = capsys.readouterr().out.strip()
    assert server.request("GET", "/v1/jobs", key=key).status_code == 200
    assert main(["serve-key", "list", "--data", str(server.data)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.endswith("cli-test"))
    assert key not in line and key[:10] in line and "live" in line
    key_id = line.split()[0]
    assert main(["serve-key", "revoke", key_id, "--data", str(server.data)]) == 0
    assert server.request("GET", "/v1/jobs", key=key).status_code == 401
    assert main(["serve-key", "revoke", key_id, "--data", str(server.data)]) == 2
    assert "no live key" in capsys.readouterr().err


def test_compress_on_a_server_downloads_the_package(server, tmp_path, monkeypatch, capsys):
    from uqcit.package import read_metadata

    monkeypatch.setenv("UQCIT_API_KEY", server.key)
    QUICK.save(tmp_path / "quick.json")
    out, report = tmp_path / "pkg", tmp_path / "report.json"
    assert main(["compress", "--server", server.url, "--model", "tiny-llama", "--recipe",
                 str(tmp_path / "quick.json"), "--out", str(out), "--json", str(report), "--no-progress"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert read_metadata(out)["method"] == "rtn-w4-g128"
    assert json.loads(report.read_text())["package"] == str(out)


def test_compress_on_a_server_fails_in_one_line(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BAD_KEY", "uqk_wrong")
    base = ["compress", "--server", server.url, "--model", "tiny-llama", "--recipe", "rtn-w4-g128",
            "--out", str(tmp_path / "pkg"), "--no-progress"]
    for argv, words in ((base + ["--api-key-env", "BAD_KEY"], "server: 401 unauthorized"),
                        (base + ["--api-key-env", "UNSET_VAR_XYZ"], "UNSET_VAR_XYZ is not set"),
                        (base + ["--sign", "k.pem"], "--server-sign"),
                        (["compress", "--server-sign", "--out", str(tmp_path / "p")], "needs --server"),
                        (["serve"], "--data")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("uqcit: error:") and words in err and err.count("\n") == 1, err
    monkeypatch.setenv("UQCIT_API_KEY", server.key)
    assert main(base[:4] + ["etc/passwd"] + base[5:]) == 2  # the server's refusal, one line
    assert "server: 422 bad_model" in capsys.readouterr().err
