import itertools

import pytest

import dmaplane

_names = itertools.count()


@pytest.fixture
def testbed():
    return dmaplane.Testbed.builtin()


@pytest.fixture
def pair(testbed):
    """Two agents on one simulated testbed, ``a`` connected to ``b``."""
    n = next(_names)
    with dmaplane.Agent(f"a{n}", nics=["nic0"], testbed=testbed) as a, dmaplane.Agent(
        f"b{n}", nics=["nic1"], testbed=testbed
    ) as b:
        yield a, b, a.connect(b.metadata())
