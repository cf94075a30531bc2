"""The docs keep up with the code: every hook documented with its exact signature, every key described."""

from __future__ import annotations

import inspect
import re

from unetlab.config.schema import TOP_LEVEL_KEYS, iter_fields, reference_markdown
from unetlab.plugin_api import hookspecs

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
    # regenerate with: python -c "from unetlab.config.schema import reference_markdown as r; print(r())"
    assert reference_markdown() in (REPO / "README.md").read_text()


def test_readme_and_ci_agree_on_the_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", readme, re.DOTALL).group(1).strip()
    assert command in ci, "the README's test command must be what .ci/run executes"


def _doc_section(docs: str, heading: str) -> str:
    start = docs.index(heading)
    following = docs.find("\n### ", start + len(heading))
    return docs[start:following if following != -1 else None]


def test_one_kind_one_definition_hookspecs_checks_schema_and_docs_agree():
    from unetlab.plugin_api.conformance import CHECKS
    from unetlab.plugin_api.registry import KINDS

    docs = (REPO / "docs" / "plugins.md").read_text()
    component_hooks = {name for name in HOOKS if name.startswith("register_")}
    assert component_hooks == {kind.hook for kind in KINDS.values()}
    assert list(CHECKS) == list(KINDS)
    schema_kinds = {field.kind for _, field in iter_fields() if field.kind}
    assert schema_kinds == set(KINDS), "every kind is configurable in an experiment file, and only kinds"
    for kind in KINDS.values():
        args = kind.contract_args
        spec_doc = inspect.getdoc(getattr(hookspecs, kind.hook))
        assert f"factory({', '.join(args + ('**params',))})" in spec_doc, (kind.hook, spec_doc)
        section = _doc_section(docs, f"### `{kind.hook}(register)`")
        expected = ("Contract arguments: " + ", ".join(f"`{a}`" for a in args)) if args else "No contract arguments"
        assert expected in section, f"docs/plugins.md, {kind.hook}: expected '{expected}'"


def test_the_register_callback_is_documented_with_its_exact_signature():
    from unetlab.plugin_api.host import PluginHost, module_from_functions

    seen = []
    host = PluginHost(autoload=False)
    host.register(module_from_functions("probe", register_fusions=lambda register: seen.append(register)))
    _ = host.registry
    params = [p for name, p in inspect.signature(seen[0]).parameters.items() if not name.startswith("_")]
    plain = f"register({', '.join(p.name if p.default is p.empty else f'{p.name}={p.default!r}' for p in params)})"
    assert plain == "register(name, factory, description=None, direction=None, binary_only=False)"
    assert plain in (REPO / "docs" / "plugins.md").read_text(), plain
    assert plain in inspect.getdoc(hookspecs), plain
