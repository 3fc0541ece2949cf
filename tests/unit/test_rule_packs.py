"""The shipped rule packs (proxy/rulepacks/*.yaml, linked from rules/): every test vector is a
test, the packs load together, and ``xmpp-front rules test`` reports and exits as documented."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from proxy.rules import RuleSet, read_rule_file
from proxy.rules_cli import (
    check_rule_files,
    PACKS_DIR,
    default_rule_paths,
    parse_stanza,
    rules_test_main,
    run_file_vectors,
    run_vector,
)

ROOT = Path(__file__).resolve().parents[2]
PACKS = sorted((ROOT / "rules").glob("*.yaml"))
INSTALLED = sorted((ROOT / "proxy" / "rulepacks").glob("*.yaml"))


def _vectors() -> list[Any]:
    params = []
    for pack in PACKS:
        rule_file = read_rule_file(pack)
        for i, vector in enumerate(rule_file.vectors, 1):
            name = vector.get("name", f"#{i}") if isinstance(vector, dict) else f"#{i}"
            params.append(pytest.param(pack, i, id=f"{pack.stem}::{name}"))
    return params


@pytest.mark.parametrize("pack, index", _vectors())
def test_pack_vector(pack: Path, index: int) -> None:
    rule_file = read_rule_file(pack)
    rules = RuleSet.from_rules(rule_file.rules, rule_file.source,
                               namespaces=rule_file.namespaces)
    result = run_vector(rules, rule_file.vectors[index - 1], rule_file.source, index)
    assert result.passed, "\n".join(result.detail)


def test_there_are_at_least_four_documented_packs_with_vectors() -> None:
    assert len(PACKS) >= 4
    readme = (ROOT / "rules" / "README.md").read_text(encoding="utf-8")
    docs = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    for pack in PACKS:
        text = pack.read_text(encoding="utf-8")
        assert text.startswith(f"# {pack.stem}:"), f"{pack.name}: no header comment"
        rule_file = read_rule_file(pack)
        assert rule_file.description, f"{pack.name}: no description"
        assert len(rule_file.vectors) >= 3, f"{pack.name}: too few vectors"
        assert pack.name in readme, f"{pack.name} is not in rules/README.md"
        assert pack.name in docs, f"{pack.name} is not in docs/rules.md"


def test_every_rule_of_every_pack_is_exercised_by_a_vector() -> None:
    for pack in PACKS:
        rule_file = read_rule_file(pack)
        rules = RuleSet.from_rules(rule_file.rules, rule_file.source,
                                   namespaces=rule_file.namespaces)
        hit: set[str] = set()
        for vector in rule_file.vectors:
            hit.update(rules.apply(vector["direction"], parse_stanza(vector["in"])).matched)
        assert hit == set(rules.names), f"{pack.name}: no vector for {set(rules.names) - hit}"


def test_all_packs_load_together_and_check_clean() -> None:
    rules = RuleSet.load(PACKS)
    assert len(rules.names) == len(set(rules.names))
    assert check_rule_files(PACKS) == []


def test_rules_test_main_runs_the_shipped_packs_by_default(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    assert [p.resolve() for p in default_rule_paths()] == [p.resolve() for p in PACKS]
    assert rules_test_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = sum(len(read_rule_file(p).vectors) for p in PACKS)
    assert lines[-1] == f"{total} passed, 0 failed"
    assert sum(line.startswith("PASS ") for line in lines) == total


FAILING_PACK = """\
# a deliberately failing pack
rules:
  - name: tag-lang
    match: {kind: message}
    actions:
      - set_attr: {name: "xml:lang", value: en}
vectors:
  - name: passes
    direction: c2s
    in: "<message to='b@x'><body>hi</body></message>"
    out: "<message xml:lang='en' to='b@x'><body>hi</body></message>"
  - name: fails
    direction: s2c
    in: "<message to='b@x'><body>hi</body></message>"
    out: "<message to='b@x' xml:lang='de'><body>hi</body></message>"
"""


def test_rules_test_main_on_a_failing_pack(tmp_path: Path) -> None:
    pack = tmp_path / "failing.yaml"
    pack.write_text(FAILING_PACK, encoding="utf-8")
    out = io.StringIO()
    assert rules_test_main([str(pack)], out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"PASS {pack}: passes"
    assert lines[1] == f"FAIL {pack}: fails"
    assert '    -<message xmlns="jabber:client" to="b@x" xml:lang="de">' in lines
    assert '    +<message xmlns="jabber:client" to="b@x" xml:lang="en">' in lines
    assert lines[-1] == "1 passed, 1 failed"


def test_rules_test_main_on_a_broken_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(FAILING_PACK.split("  - name: fails")[0], encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text("- name: x\n  match: {xpath: 'nope:x'}\n", encoding="utf-8")
    out = io.StringIO()
    assert rules_test_main([str(good), str(broken)], out) == 2
    lines = out.getvalue().splitlines()
    assert lines[0] == f"PASS {good}: passes"
    assert lines[1].startswith(f"ERROR {broken}: rule 'x': bad XPath 'nope:x'")
    assert lines[-1] == "1 passed, 0 failed"


def test_malformed_vectors_fail_with_a_reason(tmp_path: Path) -> None:
    pack = tmp_path / "odd.yaml"
    pack.write_text("rules: [{name: r}]\nvectors:\n"
                    "  - {name: no-out, direction: c2s, in: '<message/>'}\n"
                    "  - {name: bad-xml, direction: c2s, in: '<message>', out: null}\n"
                    "  - {name: sideways, direction: up, in: '<message/>', out: null}\n"
                    "  - {name: dropped, direction: c2s, in: '<message/>', out: null}\n",
                    encoding="utf-8")
    results = run_file_vectors(pack)
    assert [r.passed for r in results] == [False] * 4
    assert "missing 'out'" in results[0].detail[0]
    assert "bad vector" in results[1].detail[0]
    assert "'direction' must be c2s or s2c" in results[2].detail[0]
    assert "expected the stanza to be dropped" in results[3].detail[0]
    problems = check_rule_files([pack])
    assert any("vector 'no-out': missing 'out'" in p for p in problems)
    assert any("vector 'sideways'" in p for p in problems)


def test_check_rule_files_reports_each_file_and_duplicates_across_files(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("- name: same\n", encoding="utf-8")
    b = tmp_path / "b.yaml"
    b.write_text("- name: same\n", encoding="utf-8")
    c = tmp_path / "c.yaml"
    c.write_text("- name: c\n  actions: [explode]\n", encoding="utf-8")
    assert check_rule_files([a]) == []
    assert check_rule_files([a, b]) == [f"{b}: rule 'same': duplicate rule name (also in {a})"]
    assert check_rule_files([a, c]) == [f"{c}: rule 'c': unknown action 'explode' (known: "
                                        "drop, error, set_attr, remove_attr, remove, add, "
                                        "replace, redirect, log, stop)"]


def test_the_repository_rules_folder_is_the_packaged_packs() -> None:
    """rules/ (for the README, configurations and habits) and the package data are one set
    of files: each rules/*.yaml is a link to the pack installed with the package."""
    assert PACKS_DIR == ROOT / "proxy" / "rulepacks"
    assert [p.name for p in PACKS] == [p.name for p in INSTALLED] and PACKS
    for pack, installed in zip(PACKS, INSTALLED, strict=True):
        assert pack.resolve() == installed.resolve(), f"{pack} is not a link to {installed}"


def test_without_a_rules_folder_here_the_installed_packs_are_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_rule_paths() == INSTALLED
    assert rules_test_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"PASS {INSTALLED[0]}: " in "\n".join(lines)
    total = sum(len(read_rule_file(p).vectors) for p in INSTALLED)
    assert lines[-1] == f"{total} passed, 0 failed"


def test_rules_test_takes_folders(tmp_path: Path) -> None:
    out = io.StringIO()
    assert rules_test_main([str(ROOT / "rules")], out) == 0
    total = sum(len(read_rule_file(p).vectors) for p in PACKS)
    assert out.getvalue().splitlines()[-1] == f"{total} passed, 0 failed"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "b-failing.yml").write_text(FAILING_PACK, encoding="utf-8")
    (mine / "a-good.yaml").write_text(FAILING_PACK.split("  - name: fails")[0],
                                      encoding="utf-8")
    (mine / "notes.txt").write_text("not a rule file", encoding="utf-8")
    (mine / "sub.yaml").mkdir()  # a folder is not a rule file, whatever its name
    out = io.StringIO()
    assert rules_test_main([str(mine)], out) == 1
    lines = out.getvalue().splitlines()
    assert lines[:3] == [f"PASS {mine / 'a-good.yaml'}: passes",
                         f"PASS {mine / 'b-failing.yml'}: passes",
                         f"FAIL {mine / 'b-failing.yml'}: fails"]
    assert lines[-1] == "2 passed, 1 failed"


def test_rules_test_on_an_empty_folder_or_a_missing_path_exits_2(tmp_path: Path) -> None:
    out = io.StringIO()
    assert rules_test_main([str(tmp_path)], out) == 2
    assert out.getvalue().splitlines()[0] == (
        f"ERROR {tmp_path}: no rule files (*.yaml, *.yml) in this folder")
    out = io.StringIO()
    assert rules_test_main([str(tmp_path / "missing.yaml")], out) == 2
    assert out.getvalue().splitlines()[0].startswith(
        f"ERROR {tmp_path / 'missing.yaml'}: cannot read")
