"""Kept for compatibility: the rootfs builder lives in :mod:`pytest_runtimefaults.host.rootfs`."""

from __future__ import annotations

from pytest_runtimefaults.host.rootfs import (
    DEFAULT_ENV,
    build_bundle,
    build_image_tar,
    build_rootfs,
    bundle_config,
    busybox_image_tar,
    find_busybox,
)

__all__ = [
    "DEFAULT_ENV",
    "build_bundle",
    "build_image_tar",
    "build_rootfs",
    "bundle_config",
    "busybox_image_tar",
    "find_busybox",
]
