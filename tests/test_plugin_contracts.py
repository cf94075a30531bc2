"""The dataset-source contract's optional capabilities: a source with them is read, one without gets the defaults."""

import inspect

from unetlab.plugin_api.contracts import (
    DatasetSource,
    Tracker,
    ignore_index_of,
    image_size_of,
    normalization_of,
    root_of,
    self_check_of,
    validates_whole_images,
)
from unetlab.tracking.run_tracker import RunTracker


class MinimalSource:
    """A third-party source written against the 0.1 docs: only the required part."""

    in_channels = 1
    num_classes = 2

    def split(self, name):
        return []


class FullSource(MinimalSource):
    image_size = [32, 48]
    ignore_index = 255
    normalization = {"kind": "zscore"}
    whole_image_validation = True
    root = "/data/x"

    def check(self):
        return ["image 3: empty mask"]


def test_minimal_source_gets_the_documented_defaults():
    source = MinimalSource()
    assert isinstance(source, DatasetSource)
    assert (image_size_of(source), ignore_index_of(source), normalization_of(source)) == (None, None, None)
    assert (validates_whole_images(source), root_of(source), self_check_of(source)) == (False, None, None)


def test_full_source_capabilities_are_read():
    source = FullSource()
    assert image_size_of(source) == (32, 48)
    assert ignore_index_of(source) == 255
    assert normalization_of(source) == {"kind": "zscore"}
    assert validates_whole_images(source) is True
    assert root_of(source) == "/data/x"
    assert self_check_of(source)() == ["image 3: empty mask"]


def test_an_object_without_split_is_not_a_source():
    class NoSplit:
        in_channels, num_classes = 1, 2
    assert not isinstance(NoSplit(), DatasetSource)


def test_run_tracker_offers_every_method_of_the_tracker_protocol():
    wanted = {n for n in vars(Tracker) if not n.startswith("_")}
    for name in wanted:
        assert inspect.signature(getattr(RunTracker, name)).parameters.keys() == \
            inspect.signature(getattr(Tracker, name)).parameters.keys(), name
