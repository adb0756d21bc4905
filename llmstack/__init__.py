"""Shared spine of the train -> compress -> serve stack: errors, config loading, artifacts, CLI.

Kept deliberately small: stages talk to each other through artifacts (folders + manifest.json), never by
importing each other's code.
"""
__version__ = "0.1.0"
