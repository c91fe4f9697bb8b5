"""The project installs from its own files: pins in pyproject.toml and environment.yml agree."""

import re
import tomllib
from pathlib import Path

import yaml  # noqa: F401  (pyyaml comes with transformers/accelerate)

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    return dict(_split(r) for r in reqs)


def _split(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    assert version, f"dependency {req!r} is not pinned with =="
    return re.sub(r"[-_.]+", "-", name.strip().lower()), version.strip()


def test_every_dependency_is_pinned():
    pins = _pyproject_pins()
    assert pins["torch"] == "2.13.0"  # the CPU wheel on disk; a looser pin pulls a multi-GB CUDA build
    assert pins["transformers"].startswith("5.")


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = dict(_split(r) for r in pip_section if not r.startswith("-e"))
    assert conda_pins == _pyproject_pins()
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
    assert "HF_HUB_OFFLINE=1" in ci
