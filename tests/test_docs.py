"""The README stays a door, every relative link of the docs resolves, and docs/schemas.md is
what the code's schemas render to."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from rank1_core import schemas

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link or image outside code blocks that is not a URL or
    an anchor of the same page."""
    out, fence = [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^(https?|mailto):|^#", target):
                out.append((i, target))
    return out


def test_readme_is_a_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= 320, f"README.md has {n} lines; move detail to docs/ (at most 320)"
    assert "make test" in text and "make demo" in text
    assert (ROOT / ".ci" / "run").read_text().count("make test") == 1


def test_every_relative_link_resolves():
    broken = []
    for path in DOCS:
        for line, target in relative_links(path):
            file = target.split("#", 1)[0]
            if not (path.parent / file).exists():
                broken.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
    assert sum(len(relative_links(p)) for p in DOCS) > 50  # the checker does see the links


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md#x) ![img](img/a.png) [web](https://x.org)\n"
                    "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n")
    assert relative_links(page) == [(1, "page.md"), (1, "missing.md#x"), (1, "img/a.png")]


def test_demo_concepts_marker_kept_once():
    hits = [p for p in DOCS if "<!-- demo:concepts -->" in p.read_text(encoding="utf-8")]
    assert len(hits) == 1, hits


def test_schemas_md_is_generated_from_the_code():
    want = schemas.markdown()
    have = (ROOT / "docs" / "schemas.md").read_text(encoding="utf-8")
    assert have == want, "docs/schemas.md is stale: python -m rank1_core.schemas --markdown > docs/schemas.md"


def test_readme_stage_table_is_the_stage_graph():
    from rank1_core.stages import markdown

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- stages: python -m rank1_core.stages --markdown", "<!-- /stages -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    have = text.split(begin, 1)[1].split("\n", 1)[1].split(end, 1)[0]
    assert have == markdown(), ("README.md's stage table differs from rank1_core.stages: paste "
                                "`python -m rank1_core.stages --markdown` between its <!-- stages --> markers")


def test_every_schema_column_is_described_and_rendered():
    md = schemas.markdown()
    for t in schemas.TABLES:
        schema = t.schema()
        assert isinstance(schema, pa.Schema) and len(schema) == len(t.columns)
        for f in schema:
            assert f"| `{f.name}` | `{str(f.type).replace('item: ', '')}` |" in md


def test_a_drifted_description_is_an_error(monkeypatch):
    t = schemas.TABLES[0]
    cols = dict(t.columns)
    cols.pop(next(iter(cols)))
    cols["no_such_column"] = "x"
    monkeypatch.setattr(schemas, "TABLES", [schemas.Table(t.stage, t.path, t.source, t.what, cols, t.build)])
    drift = r"prepare/tokens.*undescribed columns \['doc_id'\].*absent \['no_such_column'\]"
    with pytest.raises(ValueError, match=drift):
        schemas.check()
