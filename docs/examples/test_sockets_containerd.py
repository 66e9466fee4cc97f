"""containerd SIGKILLed with a container running, restarted over its socket."""

import pytest


@pytest.mark.recovers(within=20, probe="daemon containerd")
def test_container_survives_a_containerd_oom_kill(containerd):
    image = containerd.import_busybox()
    containerd.run(image, "web", "sleep", "60", detach=True)

    seconds = containerd.crash_restart()  # SIGKILL, restart over the stale socket

    assert seconds < 10
    assert "RUNNING" in containerd.ctr("tasks", "ls").stdout
    assert containerd.fatal_errors() == []
    containerd.remove_all_containers()
