"""The optional compiled part: the D-Bus proxy's fused read-and-relay (issue 17).

Everything else is in pyproject.toml.  ``optional=True``: where no C compiler
or Python headers exist the build goes on without it, and the proxy uses its
pure-Python path (set RUNTIMEFAULTS_PURE_PYTHON=1 to force that path).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pytest_runtimefaults.dbus._fastpath",
            ["pytest_runtimefaults/dbus/_fastpath.c"],
            optional=True,
        )
    ]
)
