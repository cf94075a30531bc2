"""What ``--resume`` checks before it continues a run: the run's data and the code of its local plugins are
the ones it was trained with. A run continued on other data, or with a plugin that now computes something
else, would end as a mix of two experiments under one name; so either change is refused in one line.

Runs record both digests as tags when they are created (``unetlab.data_digest``, ``unetlab.code_digest``);
runs of older versions without them are not checked.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetlab.errors import UnetlabError
from unetlab.tracking import tags as run_tags

if TYPE_CHECKING:
    from unetlab.plugin_api.host import PluginHost
    from unetlab.training.preflight import Prepared

__all__ = ["CODE_DIGEST_TAG", "DATA_DIGEST_TAG", "ResumeRefused", "check_unchanged", "code_digest"]

DATA_DIGEST_TAG, CODE_DIGEST_TAG = run_tags.DATA_DIGEST, run_tags.CODE_DIGEST


class ResumeRefused(UnetlabError):
    """A run to resume was trained on other data or with other plugin code than there is now."""


def _plugin_files(host: PluginHost) -> dict[str, Path]:
    """Plugin name -> its source file, for plugins that are local code (a .py file named in an experiment
    file, or a module loaded by name from the import path), not an installed distribution (whose version
    is logged as a param)."""
    files = {}
    for info in host.plugins.values():
        if info.distribution or info.first_party or info.broken:
            continue
        path = Path(info.source)
        if info.source.startswith("module "):
            module = sys.modules.get(info.source[len("module "):])
            path = Path(getattr(module, "__file__", None) or "")
        if path.suffix == ".py" and path.is_file():
            files[info.name] = path
    return files


def code_digest(host: PluginHost) -> str:
    """A digest of the source of every local plugin loaded (their names and file contents): it changes when
    any of them is edited; "" when there are none."""
    files = _plugin_files(host)
    if not files:
        return ""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def check_unchanged(run: Any, prepared: Prepared, host: PluginHost, code: str | None = None) -> None:
    """Raise ``ResumeRefused`` (one line) when the MLflow run ``run`` recorded another data or plugin-code
    digest than ``prepared``'s data and ``host``'s plugins have now."""
    from unetlab.training.dataset_identity import dataset_identity

    tags, name = run.data.tags, prepared.run.name
    recorded = tags.get(DATA_DIGEST_TAG)
    if recorded:
        now = dataset_identity(prepared)[1]
        if now != recorded:
            raise ResumeRefused(f"--resume: run '{name}' was trained on other data (digest {recorded}, now {now}: "
                                "files added, removed, resized or modified); continuing it would mix two datasets in "
                                "one run. Restore the data, or run without --resume to train it anew")
    recorded = tags.get(CODE_DIGEST_TAG)
    if recorded is not None:
        now = code if code is not None else code_digest(host)
        if now != recorded:
            plugins = ", ".join(sorted(_plugin_files(host))) or "no local plugin now"
            raise ResumeRefused(f"--resume: run '{name}' was trained with other local plugin code (digest "
                                f"{recorded or 'none'}, now {now or 'none'}; plugins: {plugins}); continuing it "
                                "would mix two versions of the code in one run. Restore the code, or run without "
                                "--resume to train it anew")
