"""Parallel podman network create / rm / run on netavark: every outcome is a
success or a correct refusal, and the state agrees afterwards."""


def test_podman_network_churn_is_consistent(podman_netavark, netavark_network_churn):
    churn = netavark_network_churn(workers=3, rounds=4).wait()

    assert len(churn.ops) == 12
    # No ENOENT on a config file, no `network not found` for a network that
    # exists, no IPAM conflict (podman 4.3 and 5 take a lock around these).
    assert churn.races() == [], churn.report()
    # podman network ls == the files; no container, veth or firewall rule left.
    assert churn.check_state() == [], churn.report()
