"""A macvlan network must come up as macvlan while its file is being rewritten."""

import json
import time

from pytest_runtimefaults.cni import validate_config
from pytest_runtimefaults.netns import link_kind


def test_macvlan_stays_macvlan(cni_dir, cni_sandbox, cni_racing_writer):
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_racing_writer({"10-mac.conflist": mac, "20-bridge.conflist": cni_dir.bridge()})
    ns = cni_sandbox.container()
    for i in range(10):
        # Look the network up by name; re-read a torn file, never substitute another.
        while True:
            data = cni_dir.path("10-mac.conflist").read_bytes()
            if validate_config(data) is None:
                break
            time.sleep(0.001)
        conf = json.loads(data)
        cni_sandbox.add(conf, ns, container_id=f"c{i}")
        assert link_kind(ns.name, "eth0") == "macvlan"
        cni_sandbox.delete(conf, ns, container_id=f"c{i}")
