"""The claims report: verdicts come from the records by the rules in claims.json, never from the code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from uqcit.cli import main
from uqcit.core.keys import ConfigError
from uqcit.validation.report import build_report, evaluate_claim, load_claims
from uqcit.validation.rules import VERDICTS

ROOT = Path(__file__).resolve().parents[2]

# The claims the issue names: each must be in the list, whatever its verdict.
REQUIRED = {"000-prime-n-over-ln-n", "000-99-percent-smaller", "000-meaningful-outputs",
            "000-self-retraining-restores", "000-finetune-data-speed", "000-inference-time", "000-wrapper-tamper",
            "002-pattern-sweep", "002-level3-dominance", "002-noise-curve", "002-ablation-rotation",
            "002-compensation", "002-ppl-at-6.4-bits", "002-ablation-binary-vs-uniform",
            "002-compression-capability", "002-ablation-level3", "002-binary-concentration-package"}


def _claim(**rule) -> dict:
    return {"id": "c", "source": "002", "section": "§0", "claim": "x",
            "inputs": {"a": {"file": "r.json", "method": "m", "field": "kl"},
                       "b": {"file": "r.json", "method": "base", "field": "kl"}},
            "figure": {"expression": "1 - a / b"}, "rule": rule}


@pytest.mark.parametrize("kl, verdict", [(0.5, "holds"), (0.95, "partly"), (1.5, "does not hold")])
def test_verdict_follows_the_records(kl, verdict):
    records = {"r.json": [{"method": "m", "kl": kl}, {"method": "base", "kl": 1.0}]}
    res = evaluate_claim(_claim(kind="at_least", holds=0.2, partly=0.01), records)
    assert (res.verdict, res.figure) == (verdict, pytest.approx(1 - kl))


def test_missing_record_and_undefined_figure():
    rule = dict(kind="at_least", holds=0.2)
    missing = evaluate_claim(_claim(**rule), {"r.json": [{"method": "base", "kl": 1.0}]})
    assert missing.verdict == "not measured yet" and "m" in missing.reason
    undefined = evaluate_claim(_claim(**rule), {"r.json": [{"method": "m", "kl": 1.0}, {"method": "base", "kl": 0.0}]})
    assert undefined.verdict == "not measurable here" and "division by zero" in undefined.reason


def test_reduced_protocol_is_stated():
    records = {"r.json": [{"method": "m", "kl": 0.5, "full_protocol": False, "windows": 4},
                          {"method": "base", "kl": 1.0, "full_protocol": True, "windows": 32}]}
    assert "4 windows" in evaluate_claim(_claim(kind="at_least", holds=0.2), records).protocol
    records["r.json"][0] = {"method": "m", "kl": 0.5, "full_protocol": False, "reduced": "steps 8, batch 2"}
    assert "r.json: steps 8, batch 2" in evaluate_claim(_claim(kind="at_least", holds=0.2), records).protocol


def test_claims_file_is_checked(tmp_path):
    data = load_claims()
    assert REQUIRED <= {c["id"] for c in data["claims"]}
    data["claims"][0]["colour"] = "red"
    bad = tmp_path / "claims.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="colour"):
        load_claims(bad)


def test_every_claim_evaluates_on_the_repository_records():
    report = build_report(ROOT / "benchmarks" / "results")
    assert len(report.claims) == len(load_claims()["claims"])
    assert all(c.verdict in VERDICTS and c.reason for c in report.claims)
    for c in report.claims:  # a measured claim shows its figure; one not measured yet says how
        assert (c.figure is not None) or c.verdict in ("not measured yet", "not measurable here")
        assert c.command or c.verdict == "not measurable here"


def test_cli_writes_html_and_json(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "baselines.json").write_text(json.dumps(
        [{"method": "reference-fp32", "ppl": 20.0}, {"method": "preset-binary-concentration", "ppl": 25.0, "bpw": 6.5}]))
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "claims_report.json").read_text())
    by_id = {c["id"]: c for c in data["claims"]}
    assert by_id["002-ppl-at-6.4-bits"]["verdict"] == "does not hold"  # 25 % worse, from the record above
    assert by_id["002-ppl-at-6.4-bits"]["figure"] == pytest.approx(0.25)
    assert by_id["002-noise-curve"]["verdict"] == "not measured yet"
    html = (tmp_path / "out" / "claims_report.html").read_text()
    assert html.count("<section class='claim'") == len(data["claims"])
    assert "claims_report.html" in capsys.readouterr().out


def test_cli_names_a_missing_results_folder(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
