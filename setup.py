"""The optional compiled part: the D-Bus proxy's relay loop and framer split (issue 17).

Everything else is in pyproject.toml.  ``optional=True``: where no C compiler
or Python headers exist (Debian: gcc, python3-dev) the build goes on without
it, and the proxy uses its pure-Python path (set RUNTIMEFAULTS_PURE_PYTHON=1
to force that path; ``runtimefaults doctor`` says which one is active).  See
docs/dbus-proxy.md, "Speed".
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
