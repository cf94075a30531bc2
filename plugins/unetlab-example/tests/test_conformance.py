"""The example plugin's own tests: unetlab's conformance kit over every component it registers."""

import pytest

from unetlab import check_component, components_of

SMALL = {("dataset", "stripes"): {"n_train": 4, "n_val": 2}}


@pytest.mark.parametrize("kind, name", components_of("unetlab_example"))
def test_component_honours_its_contract(kind, name):
    check_component(kind, name, **SMALL.get((kind, name), {}))
