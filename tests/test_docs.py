"""The docs keep up with the code: every hook documented with its exact signature, every key described."""

from __future__ import annotations

import inspect
import re

from unetlab import hookspecs
from unetlab.schema import TOP_LEVEL_KEYS, iter_fields, reference_markdown

from conftest import REPO

HOOKS = [name for name, fn in vars(hookspecs).items()
         if callable(fn) and hasattr(fn, "unetlab_spec")]


def test_there_are_hooks():
    assert "register_encoders" in HOOKS and "on_epoch_end" in HOOKS


def test_every_hook_is_documented_with_its_exact_signature():
    docs = (REPO / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert signature in docs, f"docs/plugins.md does not document {signature}"


def test_every_experiment_key_is_in_the_readme_reference():
    readme = (REPO / "README.md").read_text()
    for key, _ in iter_fields():
        assert re.search(rf"`{re.escape(key)}`", readme), f"README.md does not describe `{key}`"
    for key in TOP_LEVEL_KEYS:
        assert f"`{key}`" in readme, f"README.md does not describe `{key}`"


def test_readme_reference_table_is_current():
    # regenerate with: python -c "from unetlab.schema import reference_markdown as r; print(r())"
    assert reference_markdown() in (REPO / "README.md").read_text()


def test_readme_and_ci_agree_on_the_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert command in ci, "the README's test command must be what .ci/run executes"
