"""The GitHub workflow (.github/workflows/ci.yml) does what the deployment relies on: tests first, the
image in both flavours (cuda12, cuda13) built on every pull request, push to main and tag, pushed to
ghcr.io from main and tags only, tagged with the full commit sha (the PYWORKER_REF the template pins)
and a tag's name, cuda13's tags suffixed `-cuda13`; no push to main ever cancels another's build; and
`latest` moves only to main's head. actionlint checks the syntax in .ci/run.

The workflow's `${{ … }}` expressions are evaluated here for the events that matter (the few operators
it uses mean the same in Python), and the shell step that moves `latest` is run against stand-ins for
git and docker."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import yaml
from conftest import ROOT

WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
PUSHING = "${{ github.event_name == 'push' }}"
FLAVOURS = {"cuda12": "", "cuda13": "-cuda13"}  # each flavour and its tags' suffix


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def evaluate(text: str, **contexts) -> str:
    """`text` with each `${{ expression }}` replaced by its value in these contexts (`github=…`,
    `matrix=…`). Only what ci.yml uses: context properties, string literals, ==, &&, ||."""

    def value(match: re.Match) -> str:
        expression = match.group(1).replace("&&", " and ").replace("||", " or ")
        result = eval(expression, {"__builtins__": {}}, {k: SimpleNamespace(**v) for k, v in contexts.items()})
        return str(result).lower() if isinstance(result, bool) else str(result)

    return re.sub(r"\$\{\{(.*?)\}\}", value, str(text))


def push(ref: str, sha: str) -> dict:
    return {"event_name": "push", "ref": ref, "sha": sha, "repository": "Owner/Repo"}


def pull_request(number: int, sha: str) -> dict:
    return {"event_name": "pull_request", "ref": f"refs/pull/{number}/merge", "sha": sha, "repository": "Owner/Repo"}


def test_triggers_and_least_privilege():
    triggers = WORKFLOW.get("on", WORKFLOW.get(True))  # PyYAML reads the key `on` as true
    assert triggers["push"] == {"branches": ["main"], "tags": ["v*"]} and "pull_request" in triggers
    assert WORKFLOW["permissions"] == {"contents": "read"}
    assert WORKFLOW["jobs"]["image"]["permissions"] == {"contents": "read", "packages": "write"}


def test_a_newer_push_never_cancels_a_main_build_but_a_newer_pull_request_push_does():
    group, cancel = WORKFLOW["concurrency"]["group"], WORKFLOW["concurrency"]["cancel-in-progress"]
    main_a, main_b = push("refs/heads/main", "a" * 40), push("refs/heads/main", "b" * 40)
    assert evaluate(group, github=main_a) != evaluate(group, github=main_b)
    assert evaluate(cancel, github=main_b) == "false"
    tag = push("refs/tags/v1.0", "a" * 40)
    assert evaluate(group, github=tag) not in {evaluate(group, github=main_a), evaluate(group, github=main_b)}
    assert evaluate(cancel, github=tag) == "false"
    pr_a, pr_b = pull_request(7, "c" * 40), pull_request(7, "d" * 40)
    assert evaluate(group, github=pr_a) == evaluate(group, github=pr_b) != evaluate(group, github=pull_request(8, "c" * 40))
    assert evaluate(cancel, github=pr_b) == "true"


def test_the_image_is_built_in_both_flavours_after_the_tests_and_pushed_only_from_main_and_tags():
    tests, image = WORKFLOW["jobs"]["tests"], WORKFLOW["jobs"]["image"]
    assert any(s.get("run") == "bash .ci/run" for s in tests["steps"])
    assert image["needs"] == "tests"
    matrix = image["strategy"]["matrix"]["include"]
    assert {m["flavour"]: m["suffix"] for m in matrix} == FLAVOURS
    assert image["strategy"]["fail-fast"] is False  # one flavour's failure does not cancel the other's build
    assert steps_using(image, "docker/setup-buildx-action")
    (login,) = steps_using(image, "docker/login-action")
    assert login["if"] == "github.event_name == 'push'"
    assert login["with"] == {"registry": "ghcr.io", "username": "${{ github.actor }}",
                             "password": "${{ secrets.GITHUB_TOKEN }}"}
    (build,) = steps_using(image, "docker/build-push-action")
    assert build["with"]["push"] == PUSHING
    assert build["with"]["tags"] == "${{ steps.meta.outputs.tags }}"
    for flavour in FLAVOURS:
        matrix_context = {"flavour": flavour, "suffix": FLAVOURS[flavour]}
        assert evaluate(build["with"]["build-args"], matrix=matrix_context) == f"JAX_CUDA={flavour}"
        # Each flavour keeps its own layer cache: one would evict the other's in a shared scope.
        assert evaluate(build["with"]["cache-from"], matrix=matrix_context) == f"type=gha,scope=image-{flavour}"
        assert evaluate(build["with"]["cache-to"], matrix=matrix_context) == f"type=gha,mode=max,scope=image-{flavour}"


def test_tags_name_the_commit_and_a_release_tag_with_the_flavours_suffix():
    (meta,) = steps_using(WORKFLOW["jobs"]["image"], "docker/metadata-action")
    assert meta["with"]["images"] == "ghcr.io/${{ github.repository }}"
    assert meta["with"]["flavor"] == "latest=false"  # metadata-action would tag every release `latest`
    for flavour, suffix in FLAVOURS.items():
        rules = evaluate(meta["with"]["tags"], matrix={"flavour": flavour, "suffix": suffix}).splitlines()
        assert rules == [f"type=sha,format=long,prefix=,suffix={suffix}", f"type=ref,event=tag,suffix={suffix}"]


def run_latest_step(tmp: Path, head: str, sha: str, suffix: str) -> list[str]:
    """The step that moves `latest`, run with stand-ins for git (main's head is `head`) and docker
    (which records its arguments): the docker commands it ran."""
    (step,) = [s for s in WORKFLOW["jobs"]["image"]["steps"] if "imagetools" in s.get("run", "")]
    assert step["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "git").write_text(f'#!/bin/sh\n[ "$*" = "ls-remote origin refs/heads/main" ] && printf "{head}\\trefs/heads/main\\n"\n')
    calls = tmp / "docker-calls"
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    for tool in ("git", "docker"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GITHUB_SHA": sha, "GITHUB_REPOSITORY": "Owner/Repo",
           "SUFFIX": evaluate(step["env"]["SUFFIX"], matrix={"suffix": suffix})}
    shell = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]  # how Actions runs a `run:` step
    out = subprocess.run([*shell, step["run"]], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_latest_moves_only_to_mains_head(tmp_path):
    sha, newer = "a" * 40, "b" * 40
    for flavour, suffix in FLAVOURS.items():
        (tmp_path / flavour).mkdir()
        assert run_latest_step(tmp_path / flavour, sha, sha, suffix) == [
            f"buildx imagetools create --tag ghcr.io/owner/repo:latest{suffix} ghcr.io/owner/repo:{sha}{suffix}"]
    (tmp_path / "behind").mkdir()
    assert run_latest_step(tmp_path / "behind", newer, sha, "") == []  # an older build finishing late


def test_ci_lints_the_workflows():
    run = (ROOT / ".ci" / "run").read_text()
    assert "-r .ci/lint-requirements.txt" in run and "--require-hashes" in run
    assert ".venv/bin/actionlint" in run and run.index("actionlint -") < run.index("pytest")
