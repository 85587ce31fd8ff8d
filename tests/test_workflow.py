"""The GitHub workflow (.github/workflows/ci.yml) does what the deployment relies on: tests first, an
image built on every pull request and push, pushed to ghcr.io only from main, tagged with the full
commit sha (the PYWORKER_REF the template pins) and `latest`. actionlint checks its syntax in .ci/run."""

from __future__ import annotations

import yaml
from conftest import ROOT
WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
PUSHING = "${{ github.event_name == 'push' }}"


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def test_triggers_and_least_privilege():
    triggers = WORKFLOW.get("on", WORKFLOW.get(True))  # PyYAML reads the key `on` as true
    assert triggers["push"] == {"branches": ["main"]} and "pull_request" in triggers
    assert WORKFLOW["permissions"] == {"contents": "read"}
    assert WORKFLOW["jobs"]["image"]["permissions"] == {"contents": "read", "packages": "write"}


def test_the_image_is_built_after_the_tests_and_pushed_only_from_main():
    tests, image = WORKFLOW["jobs"]["tests"], WORKFLOW["jobs"]["image"]
    assert any(s.get("run") == "bash .ci/run" for s in tests["steps"])
    assert image["needs"] == "tests"
    assert steps_using(image, "docker/setup-buildx-action")
    (login,) = steps_using(image, "docker/login-action")
    assert login["if"] == "github.event_name == 'push'"
    assert login["with"] == {"registry": "ghcr.io", "username": "${{ github.actor }}",
                             "password": "${{ secrets.GITHUB_TOKEN }}"}
    (meta,) = steps_using(image, "docker/metadata-action")
    assert meta["with"]["images"] == "ghcr.io/${{ github.repository }}"
    assert meta["with"]["tags"].splitlines() == ["type=sha,format=long,prefix=",
                                            "type=raw,value=latest,enable=${{ github.ref == 'refs/heads/main' }}"]
    (build,) = steps_using(image, "docker/build-push-action")
    assert build["with"]["push"] == PUSHING
    assert build["with"]["tags"] == "${{ steps.meta.outputs.tags }}"
    assert build["with"]["cache-from"] == "type=gha" and build["with"]["cache-to"] == "type=gha,mode=max"


def test_ci_lints_the_workflows():
    run = (ROOT / ".ci" / "run").read_text()
    assert "-r .ci/lint-requirements.txt" in run and "--require-hashes" in run
    assert ".venv/bin/actionlint" in run and run.index("actionlint -") < run.index("pytest")
