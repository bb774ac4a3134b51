"""``uqcit compress --stream`` (uqcit.stream.commands)."""
import json

from uqcit.cli import EXIT_USAGE, main


def test_compress_stream_writes_the_package_and_its_report(tmp_path, save_tiny, capsys):
    src = save_tiny("llama", tmp_path / "src")
    out, report = tmp_path / "pkg", tmp_path / "report.json"
    rc = main(["compress", "--model", str(src), "--recipe", "rtn-w4-g128", "--out", str(out), "--stream",
               "--run-dir", str(tmp_path / "run"), "--json", str(report), "--no-progress"])
    assert rc == 0
    assert json.loads((out / "uqcit_metadata.json").read_text())["method"] == "rtn-w4-g128"
    data = json.loads(report.read_text())
    assert data["blocks"] == 4 and data["package_bytes"] > 0 and data["float_bytes"] > data["package_bytes"]
    assert "peak RSS" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_compress_stream_refuses_what_needs_the_whole_model(tmp_path, save_tiny, capsys):
    src = save_tiny("llama", tmp_path / "src")
    rc = main(["compress", "--model", str(src), "--recipe", "rtn-w4-g128", "--out", str(tmp_path / "pkg"),
               "--stream", "--quick", "1", "--no-progress"])
    assert rc == EXIT_USAGE
    assert "--quick cannot apply" in capsys.readouterr().err
    rc = main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "pkg"), "--stream", "--no-progress"])
    assert rc == EXIT_USAGE
    assert "'tiny-llama' is not one" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()
