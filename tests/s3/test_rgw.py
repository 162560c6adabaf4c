"""The RGW fixture itself (``tests.s3.rgw``): a cluster that cannot start fails loudly."""

import pytest

from tests.s3.rgw import RgwFailed, start_rgw

pytestmark = pytest.mark.integration


def test_a_cluster_that_cannot_start_is_an_error_with_the_scripts_words() -> None:
    with pytest.raises(RgwFailed) as e:
        start_rgw(S3_OBJECTSTORE="no-such-objectstore")
    assert "S3_OBJECTSTORE must be bluestore or memstore" in str(e.value)
    assert "failed (exit 1)" in str(e.value)
