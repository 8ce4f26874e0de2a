"""A container's command as pagewire itself would read it, environment included.

``pagewire.cli`` picks the command; a service hands the rest of its arguments to its config
dataclass (``pagewire.config.parse``), whose defaults come from PAGEWIRE_* variables. Parsing
here with the container's environment in ``os.environ`` is the same code path, so an unknown
flag or a badly typed value fails the way the container would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from k8s_manifests import Container

from pagewire import cli
from pagewire import config as pwconfig

CONFIGS: dict[str, type[pwconfig.CommonConfig]] = {
    "worker": pwconfig.WorkerConfig,
    "scheduler": pwconfig.SchedulerConfig,
    "router": pwconfig.RouterConfig,
}


def env_names(cls: type) -> set[str]:
    """Every environment variable a config class reads: PAGEWIRE_<FIELD> and the extra names."""
    fields = dataclasses.fields(cls)
    return {pwconfig.env_name(f.name) for f in fields} | {
        f.metadata["env"] for f in fields if f.metadata.get("env")
    }


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ as the container sees it, as far as pagewire's configuration reads it."""
    read = set().union(*(env_names(cls) for cls in CONFIGS.values()))
    saved = dict(os.environ)
    for name in read:
        os.environ.pop(name, None)
    os.environ.update({k: v for k, v in env.items() if k in read})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse(c: Container) -> Any:
    """The container's command as pagewire would parse it: a service's config, or the
    make-model namespace. Fails the test where pagewire would exit with a usage error."""
    args = c.args
    assert "command" not in c.spec, f"{c.name}: the image's entrypoint is `pagewire`; set args"
    assert not [a for a in args if "$(" in a], f"{c.name}: unexpanded variable in {args}"
    try:
        with environment(c.env):
            if args and args[0] in CONFIGS:
                cli.build_parser().parse_args(args[:1])  # the command exists
                return pwconfig.parse(CONFIGS[args[0]], args[1:], prog=f"pagewire {args[0]}")
            return cli.build_parser().parse_args(args)
    except SystemExit as e:  # argparse: unknown flag, bad value, missing argument
        pytest.fail(f"{c.name}: `pagewire {' '.join(args)}` is a usage error ({e.code})")
    except ValueError as e:  # a PAGEWIRE_* value the field's type does not take
        pytest.fail(f"{c.name}: environment does not parse: {e}")
