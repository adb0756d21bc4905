"""The spine every package builds on, and which imports none of them: errors that carry file / line / field
(errors.py), config loading and validation (config.py), artifact folders written atomically with their manifests and
`latest` pointers (artifacts.py), and the log (log.py)."""
