"""The names of the MLflow tags unetlab writes and reads: one home, so a writer and its readers cannot drift apart.

Every module that sets or looks up a ``unetlab.*`` tag imports its name from here. The one exception is the weights
tag (``unetlab.training.model_store.WEIGHTS_TAG``): the training layer, below this one, writes and reads it alone.
This module imports nothing, so the lightest tracking module can use it.
"""
from __future__ import annotations

__all__ = [
    "CODE_DIGEST", "COMPARE_MARGIN", "COMPARE_METRIC", "CONFIG_HASH", "CREATE_TOKEN", "DATA_DIGEST", "ERROR",
    "EXPERIMENT_FILE", "FACTOR", "FOLD", "INVOCATION", "MATRIX_PREFIX", "METRIC_DIRECTIONS", "METRIC_RANGES",
    "MODEL_URI", "OWNER_HOST", "OWNER_PID", "OWNER_SINCE", "OWNER_STARTED", "PARENT", "PEAK_MEMORY_KIND",
    "RAY_CANCEL", "ROLE", "RUN_KEY", "RUN_NAME", "SEED", "STATUS_REASON", "TRIAL_NUMBER", "TRIAL_STATE",
    "TUNED_FROM", "TUNE_SPACE", "VARIANT", "VERDICT_PREFIX", "VERSION", "matrix_tag",
]

# --- a training run's identity ---
RUN_KEY = "unetlab.run_key"                    # what --resume finds a run by
RUN_NAME = "unetlab.run_name"
VARIANT = "unetlab.variant"
SEED = "unetlab.seed"
CONFIG_HASH = "unetlab.config_hash"
MATRIX_PREFIX = "unetlab.matrix."              # + a matrix factor's dotted key
FOLD = MATRIX_PREFIX + "data.fold"
VERSION = "unetlab.version"

# --- what a run was checked against ---
DATA_DIGEST = "unetlab.data_digest"
CODE_DIGEST = "unetlab.code_digest"
METRIC_DIRECTIONS = "unetlab.metric_directions"
METRIC_RANGES = "unetlab.metric_ranges"

# --- an invocation and its parent run ---
EXPERIMENT_FILE = "unetlab.experiment_file"
INVOCATION = "unetlab.invocation"
FACTOR = "unetlab.factor"
PARENT = "unetlab.parent"

# --- a run's state and outputs ---
STATUS_REASON = "unetlab.status_reason"
ERROR = "unetlab.error"
MODEL_URI = "unetlab.model_uri"
PEAK_MEMORY_KIND = "unetlab.peak_memory_kind"
RAY_CANCEL = "unetlab.ray_cancel"
CREATE_TOKEN = "unetlab.create_token"          # makes a retried create_run idempotent

# --- who owns a RUNNING run ---
OWNER_HOST = "unetlab.owner.host"
OWNER_PID = "unetlab.owner.pid"
OWNER_STARTED = "unetlab.owner.started"
OWNER_SINCE = "unetlab.owner.since"

# --- tuning (see the tune interface) ---
ROLE = "unetlab.role"                          # trial | final | study
TRIAL_NUMBER = "unetlab.trial_number"          # 0-based Optuna number
TRIAL_STATE = "unetlab.trial_state"            # complete | pruned | failed
TUNED_FROM = "unetlab.tuned_from"              # on a final run: its variant's study run id
TUNE_SPACE = "unetlab.tune_space"              # on a study run: the space as JSON

# --- a comparison's record ---
COMPARE_MARGIN = "unetlab.compare.margin"
COMPARE_METRIC = "unetlab.compare.metric"
VERDICT_PREFIX = "unetlab.verdict."            # + "<a>_vs_<b>"


def matrix_tag(key: str) -> str:
    """The tag that records a run's value of the matrix factor ``key`` (a dotted config key)."""
    return MATRIX_PREFIX + key
