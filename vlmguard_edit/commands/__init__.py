"""The command line's commands, one module per group (cli.py registers them on its group):
each parses options, calls one function of ``vlmguard_edit.api`` and prints its report.
Importing them imports no torch."""
