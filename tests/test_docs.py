"""The documentation site: every code example runs, and the site builds strictly.

For each page under ``docs/``, and for ``README.md``, the ```` ```python````
blocks are executed in order in one namespace per page (later blocks use what
earlier ones defined).
A block whose first line is ``# requires: NAME[, NAME...]`` is skipped while
``optax_lowrank`` lacks one of those attributes (features documented ahead of
their merge), and one whose first line starts with ``# not run`` (code for
another library) is never run.  Only pages with a block that runs are
collected: a page without one has nothing to test.
Examples run with float64 *disabled*, as a reader's would, although this
test session enables it (``tests/conftest.py``).  NAME may be dotted
(``adapters.quantize_base``) for a function that is not merged yet.

The build test runs ``mkdocs build --strict`` into a temporary directory; it is
skipped only when MkDocs or its plugins are not installed
(``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
HOOKS = DOCS / "_hooks" / "olr_docs.py"


def _load_hooks():
  spec = importlib.util.spec_from_file_location("olr_docs_hooks", HOOKS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


hooks = _load_hooks()
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


def _has_examples(page: Path) -> bool:
  blocks = hooks.python_blocks(page.read_text(encoding="utf-8"))
  return any(not hooks.is_not_run(b) for b in blocks)


EXAMPLE_PAGES = [p for p in PAGES if _has_examples(p)]


def _page_id(path: Path) -> str:
  return str(path.relative_to(DOCS))


@pytest.fixture(scope="module")
def available():
  """Which ``# requires:`` names the package has, from a fresh interpreter."""
  wanted = set()
  for page in [*PAGES, README]:
    for block in hooks.python_blocks(page.read_text(encoding="utf-8")):
      wanted.update(hooks.requires_of(block))
  return hooks.package_facts(wanted)["has"]


def test_pages_exist():
  assert PAGES, f"no pages under {DOCS}"
  assert _has_examples(README), "the README has no python example that runs"


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_page_id)
def test_code_blocks_run(page, available, tmp_path, monkeypatch):
  _run_blocks(page, _page_id(page), available, tmp_path, monkeypatch)


def test_readme_code_blocks_run(available, tmp_path, monkeypatch):
  """The README's Python blocks, run as the docs' are: a first reader pastes these."""
  _run_blocks(README, "README.md", available, tmp_path, monkeypatch)


def _run_blocks(page: Path, label: str, available, tmp_path, monkeypatch):
  blocks = hooks.python_blocks(page.read_text(encoding="utf-8"))
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  namespace = {"__name__": f"docs_{page.stem}"}
  ran, skipped = 0, []
  with _float32_only():
    for i, block in enumerate(blocks, 1):
      if hooks.is_not_run(block):
        continue
      missing = [n for n in hooks.requires_of(block) if not available.get(n, False)]
      if missing:
        skipped.append((i, missing))
        continue
      try:
        code = compile(textwrap.dedent(block), f"{label}:block{i}", "exec")
        exec(code, namespace)  # noqa: S102 - running the documentation's own examples
      except Exception:
        pytest.fail(
            f"{label}, python block {i} failed:\n\n{textwrap.indent(block, '    ')}"
            f"\n\n{traceback.format_exc()}",
            pytrace=False,
        )
      ran += 1
  if not ran:
    names = sorted({n for _, m in skipped for n in m})
    pytest.skip(f"every example waits for olr.{', olr.'.join(names)}")


def test_requires_markers_name_single_attributes():
  """``# requires:`` lines list comma-separated attribute names, nothing else."""
  for page in PAGES:
    for block in hooks.python_blocks(page.read_text(encoding="utf-8")):
      for name in hooks.requires_of(block):
        assert all(part.isidentifier() for part in name.split(".")), (page, name)


def _missing_build_tools() -> list[str]:
  return [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
          if importlib.util.find_spec(m) is None]


def _float32_only():
  """A context in which JAX creates float32 by default, as in a user's program."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(False)
  from jax.experimental import disable_x64  # older JAX

  return disable_x64()


def test_site_builds_strict(tmp_path):
  missing = _missing_build_tools()
  if missing:
    pytest.skip(
        f"MkDocs tooling not installed ({', '.join(missing)}); "
        'install it with pip install -e ".[docs]"'
    )
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run(
      # No --quiet: it also silences the warnings that --strict counts.
      [sys.executable, "-m", "mkdocs", "build", "--strict",
       "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
      cwd=ROOT, capture_output=True, text=True, env=env,
  )
  warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
  assert result.returncode == 0, (
      "mkdocs build --strict failed:\n" + "\n".join(warnings or [result.stderr])
  )
  assert (tmp_path / "site" / "index.html").exists()
