"""One module per `llmstack` subcommand: `register(sub)` adds its parser (options, help), `run(args)` does the work,
importing the package that owns it (a stage, evaluation, monitoring) only then. llmstack/cli.py lists them."""
