"""The checked-in stubs in pagewire/v1 are exactly what protoc makes from protos/."""

from pathlib import Path

from pagewire.protogen import REPO, generate


def test_checked_in_stubs_are_not_stale(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    checked_in = {
        p.name: p.read_text() for p in (REPO / "pagewire" / "v1").iterdir() if p.is_file()
    }
    assert fresh.keys() == checked_in.keys()
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"run `python -m pagewire.protogen`: stale {stale}"
