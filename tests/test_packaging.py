"""The project installs from its own files: pins in pyproject.toml and environment.yml agree, and the install
compiles the bytecode of everything the toolkit imports."""

import importlib
import re
import sys
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


def _bytecode_skip() -> re.Pattern[str]:
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("BYTECODE_SKIP :="))
    return re.compile(line.partition(":=")[2].strip())


def test_install_compiles_every_module_the_toolkit_imports():
    # `make install` leaves BYTECODE_SKIP out of compileall (docs/design.md §7.32); a module the toolkit imports
    # that it leaves out would be compiled again in every process where PYTHONDONTWRITEBYTECODE=1.
    # The GGUF mapping is what SmolLM2's first load imports (dequantising into an empty cache, backbone.py): named
    # here so the test does not depend on whether this machine's cache already holds the safetensors copy (§7.33).
    skip = _bytecode_skip()
    for name in ("qanchor_lab.pipeline", "qanchor_lab.evaluate", "qanchor_lab.diagnostics", "qanchor_lab.report",
                 "qanchor_lab.explorer", "qanchor_lab.backbone", "sentence_transformers", "peft", "umap",
                 "transformers.integrations.gguf.gguf_tokenizer_mapping"):
        importlib.import_module(name)
    files = [str(getattr(m, "__file__", None) or "") for m in list(sys.modules.values())]
    installed = [f for f in files if "/site-packages/" in f]
    assert len(installed) > 1000  # the stack itself, so the check below is not vacuous
    left_out = sorted(f for f in installed if skip.search(f))
    assert not left_out, f"BYTECODE_SKIP leaves out modules the toolkit imports: {left_out[:5]}"
    # and it does leave out what it is meant to (the pattern starts at "/site-packages/")
    site = "/venv/lib/site-packages/"
    for path in ("transformers/models/gpt2/modeling_gpt2.py", "pandas/tests/test_common.py", "pip/__init__.py"):
        assert skip.search(site + path), path
    for path in ("transformers/models/gpt2/configuration_gpt2.py", "transformers/models/gpt2/tokenization_gpt2.py",
                 "transformers/models/llama/modeling_llama.py"):
        assert not skip.search(site + path), path
