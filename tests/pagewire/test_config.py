import pytest

from pagewire.config import SchedulerConfig, WorkerConfig, parse


def test_flags_override_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(SchedulerConfig, []).max_num_seqs == 256
    monkeypatch.setenv("PAGEWIRE_MAX_NUM_SEQS", "12")
    assert parse(SchedulerConfig, []).max_num_seqs == 12
    assert parse(SchedulerConfig, ["--max-num-seqs", "7"]).max_num_seqs == 7


def test_redis_url_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    assert parse(WorkerConfig, []).redis_url == "redis://example:6379/0"


def test_unknown_flag_is_an_error() -> None:
    with pytest.raises(SystemExit):
        parse(WorkerConfig, ["--no-such-flag", "1"])
