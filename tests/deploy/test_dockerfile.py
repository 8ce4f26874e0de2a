"""deploy/Dockerfile builds the image the manifests run. No image is built here (that needs a
daemon and the network); these checks hold the file against the repository and the manifests."""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch

import pytest
from k8s_manifests import OVERLAYS, REPO, load

DOCKERFILE = REPO / "deploy" / "Dockerfile"
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def context_sources() -> list[str]:
    """What COPY takes from the build context (not from another stage)."""
    sources = []
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    return sources


def ignored(path: str) -> bool:
    """Whether the Dockerfile's ignore file keeps ``path`` out of the build context: the last
    matching pattern wins, ``!`` re-includes (top-level entries are what this file names)."""
    excluded = False
    for raw in IGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch(path, pattern) or fnmatch(path.split("/")[0], pattern):
            excluded = not negate
    return excluded


def test_entrypoint_is_the_pagewire_cli() -> None:
    entry = [json.loads(rest) for word, rest in instructions() if word == "ENTRYPOINT"]
    assert entry == [["pagewire"]], "manifests give only args: the entrypoint must be pagewire"


def test_image_copies_every_package_that_pip_installs() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", project["project"]["readme"], "requirements-dev.txt"}
    copied = {s.rstrip("/") for s in context_sources()}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_build_context_holds_every_copied_path() -> None:
    for source in context_sources():
        assert (REPO / source).exists(), f"{source} is not in the repository"
        assert not ignored(source), f"{source} is excluded by {IGNORE.name}"
    assert ignored(".venv") and ignored("tests"), "the ignore file should keep the context small"


def test_torch_is_the_version_ci_tests() -> None:
    pins = dict(
        line.split("==")
        for line in (REPO / "requirements-dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    args = dict(
        rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest
    )
    assert args["TORCH_VERSION"] == pins["torch"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_user_is_the_uid_the_pods_run_as(overlay: str) -> None:
    (user,) = [rest for word, rest in instructions() if word == "USER"]
    uid = int(user.split(":")[0])
    manifests = load(overlay)
    for c in manifests.all_containers():
        if c.is_pagewire:
            assert c.workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_exposes_the_ports_pagewire_pods_declare(overlay: str) -> None:
    exposed = {int(p) for word, rest in instructions() if word == "EXPOSE" for p in rest.split()}
    declared = {
        port for c in load(overlay).all_containers() if c.is_pagewire for port in c.port_numbers()
    }
    assert declared == exposed
