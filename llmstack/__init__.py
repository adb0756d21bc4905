"""The `llmstack` command (cli.py; `python -m llmstack` too): one subcommand per stage and tool, each dispatched to
the package that does the work. It sits on top of every package; none imports it.
"""
__version__ = "0.1.0"
