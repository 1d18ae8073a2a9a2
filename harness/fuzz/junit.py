"""JUnit XML for CI dashboards: one test case per finding signature (a failure when new) plus one passing case for the run."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness.fuzz.corpus import atomic_write


def build(summary: dict) -> ET.Element:
    """A <testsuites> document in the common JUnit schema (Jenkins/Ant: testsuite, testcase, failure, system-out)."""
    new = [f for f in summary["findings"] if f.get("status", "new") == "new"]
    cases = 1 + len(summary["findings"])
    seconds = f"{summary['timing']['seconds']:.3f}"
    suites = ET.Element("testsuites", name="qcrash", tests=str(cases), failures=str(len(new)), errors="0",
                        time=seconds)
    suite = ET.SubElement(suites, "testsuite", name=f"qcrash fuzz seed {summary['seed']}", tests=str(cases),
                          failures=str(len(new)), errors="0", skipped="0", time=seconds)
    props = ET.SubElement(suite, "properties")
    for key in ("seed", "profile", "target", "inject"):
        value = summary.get(key)
        ET.SubElement(props, "property", name=key, value=",".join(value) if isinstance(value, list) else str(value))
    run = ET.SubElement(suite, "testcase", classname="qcrash.run", name="run", time=seconds)
    ET.SubElement(run, "system-out").text = (f"{summary['examples']} examples, {summary['crash_states']} crash states, "
                                             f"{len(new)} new findings")
    for f in summary["findings"]:
        case = ET.SubElement(suite, "testcase", classname=f"qcrash.{f.get('verdict', 'finding')}", name=f["signature"],
                             time="0")
        text = "\n".join(x for x in (f"rule: {f.get('rule')}", f"crash: {f.get('crash_state')}",
                                     f"evidence: {f.get('evidence')}",
                                     f"replay: qcrash replay {f.get('file')}" if f.get("file") else "") if x)
        if f.get("status", "new") == "new":
            failure = ET.SubElement(case, "failure", message=f"{f['signature']} ({f['count']} hits)",
                                    type=f.get("verdict", "finding"))
            failure.text = text
        else:
            ET.SubElement(case, "system-out").text = f"known failure, {f['count']} hits (not recorded again)\n{text}"
    return suites


def write(path: Path, summary: dict) -> None:
    tree = ET.ElementTree(build(summary))
    ET.indent(tree)
    atomic_write(path, ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True) + b"\n")
