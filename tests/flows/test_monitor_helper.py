from flows.monitor.helper import MonitorHelper
from tests.flows.helpers import small_config


def test_the_helper_started_ahead_of_its_first_job_is_one_process_and_ends_cleanly(tmp_path):
    """The run starts the helper before its first file (its imports overlap the file): a
    second start keeps the same process, a run with no job for it waits for nothing, and
    closing ends it with exit status 0."""
    settings, _ = small_config(tmp_path)
    helper = MonitorHelper(settings)
    helper.start()
    process = helper._helper
    assert process is not None and process.poll() is None
    helper.start()
    assert helper._helper is process
    helper.wait()  # no job submitted: returns at once
    helper.close()
    assert process.returncode == 0 and helper._helper is None
