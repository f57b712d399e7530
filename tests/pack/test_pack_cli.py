"""`form pack validate`: exit 0 with a summary, 1 with every error and its line, 2 for a bad path."""

import json
from pathlib import Path

from formation import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello-agent" / "Formfile"


def test_validate_the_shipped_example(capsys):
    assert cli.main(["pack", "validate", str(EXAMPLE)]) == 0
    assert "hello-agent" in capsys.readouterr().out
    assert cli.main(["pack", "validate", str(EXAMPLE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["canonical"].startswith("NAME hello-agent\n")


def test_validate_reports_every_error(tmp_path, capsys):
    f = tmp_path / "Formfile"
    f.write_text("NAME x\nVCPU 0\nFROM debian\n")
    assert cli.main(["pack", "validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:2: VCPU: vCPUs must be between 1 and 128" in err and f"{f}:3: unknown instruction 'FROM'" in err
    assert cli.main(["pack", "validate", str(f), "--json"]) == 1
    assert [e["line"] for e in json.loads(capsys.readouterr().out)["errors"]] == [2, 3]
    assert cli.main(["pack", "validate", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err
