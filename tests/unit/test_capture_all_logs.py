"""``tests.helpers.capture_all_logs`` sees info events whatever level an earlier test left."""

import logging

import structlog

from tests.helpers import capture_all_logs


def test_info_is_captured_after_a_warning_level_configuration() -> None:
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        log = structlog.get_logger("tessera.test")
        with capture_all_logs() as logs:
            log.info("retention.applied", removed=["a"])
        assert [e["event"] for e in logs] == ["retention.applied"]
        # The level the earlier configuration set is back afterwards.
        warning = structlog.make_filtering_bound_logger(logging.WARNING)  # cached per level
        assert structlog.get_config()["wrapper_class"] is warning
    finally:
        structlog.configure(**saved)
