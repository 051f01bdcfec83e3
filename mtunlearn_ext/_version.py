"""The package's version, written once: ``mtunlearn_ext.__version__``, :func:`build_info` and
setup.py (the wheel's metadata) all take it from here. setup.py reads this file by path, since
the package itself cannot be imported mid-build."""

__version__ = "0.1.0"
