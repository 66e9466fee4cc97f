"""Does your runtime write its CNI configs atomically?  Watch it."""

from pytest_runtimefaults.cni import write_atomic


def my_runtime_creates_network(cni_dir, conf):
    # Replace with your runtime: `mytool network create ...` writing into cni_dir.conf_dir
    write_atomic(cni_dir.path(cni_dir.filename(conf)), conf)


def test_no_torn_writes(cni_dir, cni_torn_write_watcher):
    for _ in range(5):
        my_runtime_creates_network(cni_dir, cni_dir.bridge())
    cni_torn_write_watcher.stop()
    assert cni_torn_write_watcher.torn == [], cni_torn_write_watcher.report()
