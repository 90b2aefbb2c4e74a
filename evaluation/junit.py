"""JUnit XML of an optimize run, for CI systems that show test results (GitLab, Jenkins, Azure, GitHub actions)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from llmopt.errors import LlmoptError
from llmopt.evaluation.report import Report


def junit_xml(report: Report | None, error: LlmoptError | None = None, suite: str = "llmopt optimize") -> str:
    """One test case for the artifact's validation and one per quality check; a run that raised is one error."""
    cases: list[ET.Element] = []

    def case(name: str, seconds: float = 0.0) -> ET.Element:
        element = ET.Element("testcase", classname=suite, name=name, time=f"{seconds:.3f}")
        cases.append(element)
        return element

    if error is not None:
        ET.SubElement(case("optimize"), "error", message=str(error), type=type(error).__name__).text = \
            f"{error}\n{getattr(error, 'hint', '')}".strip()
    if report is not None:
        if report.validation is not None:
            v = report.validation
            element = case("artifact reproduces the optimized model")
            if not v.passed:
                ET.SubElement(element, "failure", message=f"max |dlogit| {v.max_abs_logit_diff:.4g}, top-1 "
                                                          f"{v.top1_agreement:.3f}, cached decoding "
                                                          f"{v.decode_top1_agreement}")
        for check in report.checks:
            element = case(f"check {check.name}")
            if not check.passed:
                interval = f", interval {check.interval}" if check.interval else ""
                ET.SubElement(element, "failure", message=f"{check.name}: value {check.value}{interval}, threshold "
                                                          f"{check.threshold}")
    root = ET.Element("testsuites")
    failures = sum(1 for c in cases if c.find("failure") is not None)
    errors = sum(1 for c in cases if c.find("error") is not None)
    total = report.total_seconds if report is not None else 0.0
    suite_element = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures),
                                  errors=str(errors), time=f"{total:.3f}")
    suite_element.extend(cases)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
