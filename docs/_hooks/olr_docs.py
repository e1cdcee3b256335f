"""MkDocs hooks for the optax_lowrank site (loaded through ``hooks:`` in mkdocs.yml).

The site may be written ahead of some features.  These hooks keep it honest
about what the installed package actually contains, so that the site builds at
every stage of development and every page says what is missing:

* A ```` ```python```` block whose first line is ``# requires: a, b.c`` needs
  those attributes of ``optax_lowrank``.  The marker line is removed from the
  rendered page; if an attribute is missing, a note listing it is put under the
  page title.  ``tests/test_docs.py`` reads the same marker and skips the
  block.
* A block whose first line starts with ``# not run`` (code for another
  library, such as PyTorch) is shown as it is and never executed by the test.
* An API directive ``::: optax_lowrank.X...`` is rendered only if
  ``optax_lowrank`` has the attribute ``X``; otherwise it is replaced by a note.
* ``<!-- olr:other-public-names -->`` (on the API overview page) becomes one
  directive for every name in ``optax_lowrank.__all__`` that no API page covers,
  so an export added later is documented without editing the site.
* RST roles left in docstrings (``:class:`Basis```, ``:func:`~a.b.c```) are
  reduced to plain inline code in the rendered HTML.

Which attributes exist is decided in a fresh interpreter (``import
optax_lowrank`` and nothing else): importing a submodule anywhere binds it as
an attribute of the package, so the answer inside a long-lived process could
depend on what ran before.  ``tests/test_docs.py`` uses :func:`package_facts`
for the same reason.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = "optax_lowrank"

REQUIRES_RE = re.compile(r"^\s*#\s*requires:\s*(?P<names>.+?)\s*$")
NOT_RUN_RE = re.compile(r"^\s*#\s*not run\b")
FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)$")
DIRECTIVE_RE = re.compile(r"^(?P<indent>[ \t]*):::[ \t]+(?P<target>[\w.]+)[ \t]*$")
OTHER_NAMES_MARKER = "<!-- olr:other-public-names -->"
ROLE_RE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):"
    r"(?P<code><code[^>]*>)~?(?:[\w.]*\.)?(?P<name>[^<]*)</code>"
)

_PROBE = r"""
import importlib, json, sys, types
pkg = importlib.import_module(sys.argv[1])
attrs = {}
for name in dir(pkg):
    obj = getattr(pkg, name)
    # one level down, for dotted names such as "adapters.merge"
    attrs[name] = sorted(dir(obj)) if isinstance(obj, types.ModuleType) else []
exports = {}
for name in getattr(pkg, "__all__", []):
    obj = getattr(pkg, name, None)
    if isinstance(obj, types.ModuleType):
        exports[name] = obj.__name__
    else:
        exports[name] = getattr(obj, "__module__", None) or pkg.__name__
print(json.dumps({"attrs": attrs, "exports": exports}))
"""


@functools.cache
def _probe() -> dict:
  """What a fresh ``import optax_lowrank`` provides (one subprocess per process)."""
  out = subprocess.run(
      [sys.executable, "-c", _PROBE, PACKAGE],
      check=True, capture_output=True, text=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _has(dotted: str, attrs: dict) -> bool:
  head, _, rest = dotted.partition(".")
  if head not in attrs:
    return False
  return not rest or rest in attrs[head]


def package_facts(names) -> dict:
  """``{"has": {dotted_name: bool}, "exports": {name: defining module}}`` from a fresh import.

  Dotted names are resolved one level deep (``adapters.merge``).
  """
  facts = _probe()
  return {"has": {n: _has(n, facts["attrs"]) for n in names}, "exports": facts["exports"]}


def requires_of(block: str) -> list[str]:
  """The names a code block's ``# requires:`` first line lists (empty if none)."""
  first = block.lstrip("\n").split("\n", 1)[0]
  m = REQUIRES_RE.match(first)
  if not m:
    return []
  return [n.strip() for n in m.group("names").split(",") if n.strip()]


def is_not_run(block: str) -> bool:
  """Whether a code block is marked ``# not run`` on its first line."""
  return bool(NOT_RUN_RE.match(block.lstrip("\n").split("\n", 1)[0]))


def python_blocks(markdown: str) -> list[str]:
  """The bodies of the ```` ```python```` fenced blocks of a page, in order."""
  blocks, current, fence = [], None, None
  for line in markdown.split("\n"):
    m = FENCE_RE.match(line)
    if current is None:
      if m and m.group("info").strip().split(" ")[0].strip("{.") in ("python", "py"):
        current, fence = [], (m.group("indent"), m.group("fence"))
    elif m and m.group("fence") == fence[1] and not m.group("info").strip():
      blocks.append("\n".join(x[len(fence[0]):] if x.startswith(fence[0]) else x
                              for x in current))
      current = None
    else:
      current.append(line)
  return blocks


# ----------------------------------------------------------------------------
# Markdown rewriting.


def _strip_requires(markdown: str) -> tuple[str, list[str]]:
  """Drop ``# requires:`` first lines of python blocks; return the names they list."""
  out, wanted, in_block, first, fence = [], [], False, False, None
  for line in markdown.split("\n"):
    m = FENCE_RE.match(line)
    if not in_block:
      if m and m.group("info").strip().split(" ")[0].strip("{.") in ("python", "py"):
        in_block, first, fence = True, True, m.group("fence")
      out.append(line)
      continue
    if m and m.group("fence") == fence and not m.group("info").strip():
      in_block = False
      out.append(line)
      continue
    if first:
      first = False
      r = REQUIRES_RE.match(line)
      if r:
        wanted += [n.strip() for n in r.group("names").split(",") if n.strip()]
        continue
    out.append(line)
  return "\n".join(out), wanted


def _insert_after_title(markdown: str, text: str) -> str:
  lines = markdown.split("\n")
  for i, line in enumerate(lines):
    if line.startswith("# "):
      return "\n".join(lines[: i + 1] + ["", text, ""] + lines[i + 1:])
  return text + "\n\n" + markdown


def _missing_note(missing: list[str]) -> str:
  names = ", ".join(f"`olr.{n}`" for n in missing)
  return (
      '!!! warning "Not in this build yet"\n'
      f"    This page describes {names}, which the installed `optax_lowrank` does not "
      "provide yet. The examples that need it are written against the public contract "
      "and are checked as soon as it is merged."
  )


def _directive_targets(markdown: str) -> list[str]:
  return [m.group("target") for line in markdown.split("\n") if (m := DIRECTIVE_RE.match(line))]


def _gate_directives(markdown: str, has: dict) -> str:
  """Replace directives (and their indented option lines) whose module is missing."""
  out, skipping = [], None
  for line in markdown.split("\n"):
    if skipping is not None:
      if line.strip() and (len(line) - len(line.lstrip())) > skipping:
        continue
      skipping = None
    m = DIRECTIVE_RE.match(line)
    if m and m.group("target").startswith(PACKAGE + "."):
      attr = m.group("target").split(".")[1]
      if not has.get(attr, False):
        skipping = len(m.group("indent"))
        out.append(
            f'!!! note "`{m.group("target")}` is not in this build yet"\n'
            f"    `optax_lowrank` does not provide `{attr}` yet; its reference appears "
            "here once it is merged."
        )
        continue
    out.append(line)
  return "\n".join(out)


def _api_targets(docs_dir: Path) -> list[str]:
  targets = []
  for page in sorted((docs_dir / "api").glob("*.md")):
    targets += _directive_targets(page.read_text(encoding="utf-8"))
  return targets


def _uncovered(exports: dict, targets: list[str], has: dict) -> list[str]:
  """Exported names that no rendered API directive documents."""
  rendered = [t for t in targets if has.get(t.split(".")[1] if "." in t else "", False)]
  out = []
  for name, module in sorted(exports.items()):
    candidates = {f"{PACKAGE}.{name}", module, f"{module}.{name}"}
    if not candidates & set(rendered):
      out.append(name if module in (None, PACKAGE) or module.endswith("." + name)
                 else f"{module.split('.', 1)[1]}.{name}")
  return out


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - MkDocs hook signature
  docs_dir = Path(config["docs_dir"])
  markdown, wanted = _strip_requires(markdown)
  targets = _directive_targets(markdown)
  api_targets = _api_targets(docs_dir) if OTHER_NAMES_MARKER in markdown else []
  attrs = {t.split(".")[1] for t in targets + api_targets if t.count(".") >= 1}
  facts = package_facts(set(wanted) | attrs)
  has = facts["has"]
  if targets:
    markdown = _gate_directives(markdown, has)
  if OTHER_NAMES_MARKER in markdown:
    extra = _uncovered(facts["exports"], api_targets, has)
    body = "\n\n".join(f"::: {PACKAGE}.{name}" for name in extra) or (
        "Every public name is documented on one of the pages above."
    )
    markdown = markdown.replace(OTHER_NAMES_MARKER, body)
  missing = [n for n in dict.fromkeys(wanted) if not has.get(n, False)]
  if missing:
    markdown = _insert_after_title(markdown, _missing_note(missing))
  return markdown


def on_page_content(html, page, config, files):  # noqa: ARG001 - MkDocs hook signature
  return ROLE_RE.sub(lambda m: f"{m.group('code')}{m.group('name')}</code>", html)
