import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_run_dir(tmp_path_factory):
    """apply's records (guard/observe/outcome.py, guard/quick.py) stay out of /run/portguard,
    and the plan kept for the next boot out of /var/lib/portguard."""
    os.environ["PORTGUARD_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))
    os.environ["PORTGUARD_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def nobody_modules():
    """guard and click where an unprivileged user can import them (tests/unprivileged.py)."""
    from tests.unprivileged import reachable_modules

    with reachable_modules() as modules:
        yield modules
