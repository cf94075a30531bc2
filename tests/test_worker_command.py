"""The worker command line that --jobs, --ray and --nproc-per-node start: `unetlab run` must read it back."""
from __future__ import annotations

import pytest

from unetlab.cli.main import build_parser
from unetlab.runs.worker_command import worker_run_args


@pytest.mark.parametrize("output", [None, "quiet", "jsonl"])
@pytest.mark.parametrize("resume", [False, True])
def test_the_cli_parses_back_every_field_of_a_worker_command(output, resume):
    args = worker_run_args("/x/exp.yaml", ["train.epochs=2", "model.fusion=add"], resume=resume, output=output,
                           parent_run_id="abc123", run_name="concat/seed=1", only=["concat/", "add/"])
    assert args[:3] == ["-m", "unetlab", "run"]
    parsed = build_parser().parse_args(args[2:])
    assert parsed.file == "/x/exp.yaml"
    assert parsed.overrides == ["train.epochs=2", "model.fusion=add"]
    assert parsed.resume is resume
    assert parsed.quiet is (output == "quiet") and parsed.jsonl is (output == "jsonl")
    assert parsed.parent_run_id == "abc123" and parsed.run_name == ["concat/seed=1"]
    assert parsed.only == ["concat/", "add/"]


def test_a_plain_worker_command_adds_no_optional_flag():
    assert worker_run_args("e.yaml", [], resume=False) == ["-m", "unetlab", "run", "e.yaml"]
