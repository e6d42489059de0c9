"""The ``tilefleet`` command line: argument parsing, the command functions and tables.

The only code in the project that prints. Nothing imports it (``tests/test_layout.py`` checks):
the library reports through return values, exceptions and the ``tilefleet.*`` loggers, and the
entry point ``fleet.cli.main:main`` turns those into lines and exit codes.
"""
