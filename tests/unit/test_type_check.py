"""The type checker `make lint` runs: a wrong type fails it, and the project's configuration is the one applied
(strict for domain modules; servers may leave functions unannotated, but their bodies are checked). Each probe
is a small module written under a temporary `services` package and checked alone, with the project's
pyproject.toml and its cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from services.core.settings import ROOT

PROBE = textwrap.dedent(
    '''\
    """A module with wrong types."""


    def page_count(pages: list[str]) -> int:
        return ", ".join(pages)


    def first_page(pages):
        title: int = "cover"
        return title
    '''
)


def _mypy(tmp_path: Path, module: str) -> tuple[int, list[str]]:
    """Check `PROBE` as the module `module` (dotted, under `services`) and nothing else: the exit status and the
    error lines, each starting with the file's name."""
    *packages, name = module.split(".")
    folder = tmp_path
    for package in packages:
        folder /= package
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").touch()
    (folder / f"{name}.py").write_text(PROBE)
    # Run from the temporary folder, so that the probe's `services` package is the only one mypy sees.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / "build" / "mypy-cache"), str(folder.relative_to(tmp_path) / f"{name}.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    return result.returncode, [Path(line).name for line in result.stdout.splitlines() if ": error:" in line]


def test_a_wrong_type_in_a_domain_module_fails_the_check(tmp_path: Path) -> None:
    status, errors = _mypy(tmp_path, "services.search.probe")
    assert status == 1
    assert errors == [
        'probe.py:5: error: Incompatible return value type (got "str", expected "int")  [return-value]',
        # strict mode (mypy's defaults neither demand annotations nor look inside unannotated functions)
        "probe.py:8: error: Function is missing a type annotation  [no-untyped-def]",
        'probe.py:9: error: Incompatible types in assignment (expression has type "str", variable has type "int")  '
        "[assignment]",
    ]


def test_a_server_may_leave_a_function_unannotated_but_its_body_is_checked(tmp_path: Path) -> None:
    status, errors = _mypy(tmp_path, "services.search.server")
    assert status == 1
    assert errors == [
        'server.py:5: error: Incompatible return value type (got "str", expected "int")  [return-value]',
        'server.py:9: error: Incompatible types in assignment (expression has type "str", variable has type "int")  '
        "[assignment]",
    ]
