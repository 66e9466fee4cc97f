"""Sub-commands of ``runtimefaults``; each module defines ``register(subparsers)``."""
