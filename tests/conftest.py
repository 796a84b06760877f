import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_run_dir(tmp_path_factory):
    """apply's failure records (guard/observe/outcome.py) stay out of /run/portguard."""
    os.environ["PORTGUARD_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))
